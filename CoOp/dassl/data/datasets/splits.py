"""CoOp-style split files: ``{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}``.

The format the CoOp datasets read and write (``split_zhou_<Dataset>.json``, via ``OxfordPets.read_split`` /
``save_split``), plus CoOp's base/new class subsampling (``DATASET.SUBSAMPLE_CLASSES``).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

from ...utils.errors import DataError
from ...utils.tools import read_json, write_json
from .base_dataset import Datum

SPLIT_KEYS = ("train", "val", "test")
SUBSAMPLE_CHOICES = ("all", "base", "new")


def read_split(filepath: str, path_prefix: str) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """(train, val, test) from a split file; image paths are joined to ``path_prefix``."""
    split = read_json(filepath)
    missing = [k for k in SPLIT_KEYS if k not in split] if isinstance(split, dict) else list(SPLIT_KEYS)
    if missing:
        raise DataError(f"split file {filepath} lacks {missing} (expects train/val/test lists)")
    out = []
    for key in SPLIT_KEYS:
        items = []
        for entry in split[key]:
            if len(entry) != 3:
                raise DataError(f"split file {filepath}: {key} entry {entry!r} is not [path, label, classname]")
            impath, label, classname = entry
            items.append(Datum(impath=os.path.join(path_prefix, impath), label=int(label), classname=classname))
        out.append(items)
    return out[0], out[1], out[2]


def save_split(train: Sequence[Datum], val: Sequence[Datum], test: Sequence[Datum], filepath: str,
               path_prefix: str) -> None:
    """Write a split file with image paths relative to ``path_prefix``."""
    def _rows(items: Sequence[Datum]) -> list[tuple[str, int, str]]:
        rows = []
        for item in items:
            rel = item.impath.replace(path_prefix, "")
            rows.append((rel[1:] if rel.startswith("/") else rel, item.label, item.classname))
        return rows

    write_json({"train": _rows(train), "val": _rows(val), "test": _rows(test)}, filepath)
    print(f"Saved split to {filepath}")


def subsample_classes(*datasets: Sequence[Datum], subsample: str = "all") -> tuple[list[Datum], ...]:
    """CoOp's base-to-new split: ``base`` keeps the first ceil(C/2) labels of the first dataset, ``new`` the
    rest, relabelled from 0; ``all`` returns the datasets unchanged."""
    if subsample not in SUBSAMPLE_CHOICES:
        raise DataError(f"DATASET.SUBSAMPLE_CLASSES must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}")
    if subsample == "all":
        return tuple(list(d) for d in datasets)
    labels = sorted({item.label for item in datasets[0]})
    half = math.ceil(len(labels) / 2)
    selected = labels[:half] if subsample == "base" else labels[half:]
    relabel = {y: i for i, y in enumerate(selected)}
    return tuple([Datum(impath=item.impath, label=relabel[item.label], classname=item.classname)
                  for item in d if item.label in relabel] for d in datasets)
