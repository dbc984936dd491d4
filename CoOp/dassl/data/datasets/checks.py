"""Build-time dataset checks: one bad split entry is one line naming the split file, the split and the entry.

- labels are integers in ``[0, K)`` with ``K`` the number of distinct class names of the ID lists;
- one class name per label and one label per class name;
- no image listed in two of train / val / test where the protocol keeps them apart (leave-one-domain-out files);
- every listed image exists (a ``stat``, not a decode; unreadable bytes are reported when the image is loaded).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from ...utils.errors import DataError
from .base_dataset import Datum

ID_SPLITS = ("train_x", "val", "test")


def _entry(split: str, i: int, item: Datum, base: str) -> str:
    rel = os.path.relpath(item.impath, base) if base else item.impath
    return f"{split!r} entry {i} [{rel!r}, {item.label}, {item.classname!r}]"


def label_space(splits: Mapping[str, Sequence[Datum]], source: str, base: str = "",
                check_range: bool = True) -> dict[int, str]:
    """The ``label -> class name`` map of the lists; raise :class:`DataError` on a label out of range or a clash."""
    k = len({item.classname for items in splits.values() for item in items})
    for split, items in splits.items() if check_range else ():
        for i, item in enumerate(items):
            if not 0 <= item.label < k:
                raise DataError(f"{source}: {_entry(split, i, item, base)}: label out of range [0, {k}) "
                                f"({k} class names in the lists)")
    lab2name: dict[int, tuple[str, tuple]] = {}
    name2lab: dict[str, tuple[int, tuple]] = {}
    for split, items in splits.items():
        for i, item in enumerate(items):
            where = (split, i, item)  # formatted only for an error message
            seen = lab2name.setdefault(item.label, (item.classname, where))
            if seen[0] != item.classname:
                raise DataError(f"{source}: {_entry(*where, base)}: label {item.label} is {seen[0]!r} in "
                                f"{_entry(*seen[1], base)} (one class name per label)")
            seen_lab = name2lab.setdefault(item.classname, (item.label, where))
            if seen_lab[0] != item.label:
                raise DataError(f"{source}: {_entry(*where, base)}: class {item.classname!r} has label "
                                f"{seen_lab[0]} in {_entry(*seen_lab[1], base)} (one label per class name)")
    return {lab: name for lab, (name, _) in lab2name.items()}


def check_disjoint(splits: Mapping[str, Sequence[Datum]], source: str, base: str = "") -> None:
    """No image path in two of the lists (nor twice in one)."""
    first: dict[str, tuple] = {}
    for split, items in splits.items():
        for i, item in enumerate(items):
            if item.impath in first:
                raise DataError(f"{source}: {_entry(split, i, item, base)}: the same image is already listed as "
                                f"{_entry(*first[item.impath], base)} (train, val and test must not share images)")
            first[item.impath] = (split, i, item)


def check_files_exist(splits: Mapping[str, Sequence[Datum]], source: str, base: str = "") -> None:
    for split, items in splits.items():
        for i, item in enumerate(items):
            if not os.path.isfile(item.impath):
                raise DataError(f"{source}: {_entry(split, i, item, base)}: image not found: {item.impath}")


def check_split_lists(splits: Mapping[str, Sequence[Datum]], source: str, base: str = "",
                      disjoint: bool = True) -> dict[int, str]:
    """All checks on the lists read from one split file; returns the label space."""
    lab2name = label_space(splits, source, base)
    if disjoint:
        check_disjoint(splits, source, base)
    check_files_exist(splits, source, base)
    return lab2name


def check_dataset(ds: Any, source: Optional[str] = None) -> None:
    """Checks on a built dataset: one class name per ID label and back, every listed image exists."""
    source = source or getattr(ds, "split_path", "") or type(ds).__name__
    id_splits = {s: list(getattr(ds, s) or []) for s in ID_SPLITS}
    label_space(id_splits, source, check_range=False)
    check_files_exist({**id_splits, "ood_test": list(ds.ood_test or [])}, source)
