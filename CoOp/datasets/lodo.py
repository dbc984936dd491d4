"""Leave-one-domain-out datasets in the PACS layout (PACS, VLCS, DigitsDG-mini, synthetic test trees).

Layout under ``DATASET.ROOT``::

    <dataset_dir>/images/<domain>/<class>/<image>
    <dataset_dir>/test_on_<domain>.json     # {"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}

``TEST_ENV`` selects the json (``sketch``, ``test_on_sketch`` or ``test_on_sketch.json``). ``test`` is the
held-out domain, ``train``/``val`` come from the source domains. The domain of an image (``DATASET.DOMAIN_MATCH``):

* ``substring`` (official): the first domain of the official order (PACS art_painting, cartoon, photo, else
  sketch; VLCS caltech, pascal, labelme, else sun) that is a case-sensitive substring of the image's relative path,
  else the last one -- so upper-case VLCS folders all become ``sun`` (one domain, as in the official code);
* ``folder`` (named fix): the first folder of the relative path, matched case-insensitively.
"""
from __future__ import annotations

import copy
import os
from collections import Counter
from typing import Any

from dassl.data.datasets import DATASET_REGISTRY, Datum, DatasetBase
from dassl.data.datasets.checks import check_split_lists
from dassl.utils import resources
from dassl.utils.errors import ConfigError, DataError
from dassl.utils.tools import listdir_nohidden, read_json

FEWSHOT_SAMPLERS = ("official", "per_class_domain", "plain")
DOMAIN_MATCHES = ("substring", "folder")


def split_file_name(test_env: str) -> str:
    """Normalise a ``TEST_ENV`` value to ``test_on_<domain>.json``."""
    env = os.path.basename(str(test_env).strip())
    if env.endswith(".json"):
        env = env[:-5]
    if not env.startswith("test_on_"):
        env = "test_on_" + env
    return env + ".json"


class LODODataset(DatasetBase):
    """Base class: reads ``test_on_<domain>.json`` and builds few-shot ``train_x``, ``val`` and ``test``.

    Subclasses set ``dataset_dir`` (folder under the root), ``domains`` (empty: the sub-folders of
    ``images/``) and ``official_sampler`` (``"balance"`` reproduces the PACS sampler of the official code,
    ``"plain"`` the VLCS one).
    """

    dataset_dir = ""
    domains: list[str] = []
    official_domain_order: list[str] = []   # the official substring tests, in order (default: ``domains``)
    official_sampler = "plain"

    def __init__(self, cfg: Any) -> None:
        train, val, test = self.read_lodo_splits(cfg)
        num_shots = cfg.DATASET.NUM_SHOTS
        train_x = self.sample_train(train, num_shots, cfg.DATASET.FEWSHOT_SAMPLER)
        val = self.generate_fewshot_dataset(val, num_shots=num_shots)
        super().__init__(train_x=train_x, val=val, test=test)  # open-set splits: datasets.openset
        self.set_label_space(list(train) + list(test))

    def set_label_space(self, id_items: list[Datum]) -> None:
        """Classes from the full ID lists: a (class-agnostic official) few-shot train_x could miss one."""
        self._num_classes = self.get_num_classes(id_items)
        self._lab2cname, self._classnames = self.get_lab2cname(id_items)

    # ---------------------------------------------------------------- reading
    def read_lodo_splits(self, cfg: Any) -> tuple[list[Datum], list[Datum], list[Datum]]:
        root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT))
        self.dataset_root = os.path.join(root, self.dataset_dir)
        self.image_dir = os.path.join(self.dataset_root, "images")
        if not os.path.isdir(self.image_dir):
            raise DataError(f"{type(self).__name__}: image folder not found: {self.image_dir} (expected "
                            f"<root>/{self.dataset_dir}/images/<domain>/<class>/*, see the README)")
        if not cfg.TEST_ENV:
            raise ConfigError(f"{type(self).__name__} needs TEST_ENV (one of: {', '.join(self.split_files())})")
        self.split_path = os.path.join(self.dataset_root, split_file_name(cfg.TEST_ENV))
        if not os.path.isfile(self.split_path):  # accept another case (test_on_SUN.json vs TEST_ENV sun)
            match = [f for f in self.split_files() if f.lower() == os.path.basename(self.split_path).lower()]
            if len(match) == 1:
                self.split_path = os.path.join(self.dataset_root, match[0])
        if not os.path.isfile(self.split_path):
            raise DataError(f"split file not found: {self.split_path} (available: "
                            f"{', '.join(self.split_files()) or 'none'}; build them with tools/build_lodo_splits.py)")
        self.domain_match = cfg.DATASET.DOMAIN_MATCH
        if self.domain_match not in DOMAIN_MATCHES:
            raise ConfigError(f"DATASET.DOMAIN_MATCH must be one of {DOMAIN_MATCHES}, got {self.domain_match!r}")
        folders = [d.lower() for d in (self.domains or listdir_nohidden(self.image_dir, sort=True))]
        official = list(self.official_domain_order or folders)
        self.domain_list = official if self.domain_match == "substring" else folders
        st = os.stat(self.split_path)
        key = ("lodo_splits", type(self).__name__, self.split_path, st.st_size, st.st_mtime_ns, self.image_dir,
               self.domain_match, tuple(self.domain_list))
        memo = resources.memo(key, self._read_checked_lists)  # read and checked once per sweep worker
        lists = {split: [_copy(d) for d in items] for split, items in memo.items()}  # each job its own Datums
        report = resources.memo(("lodo_report", *key[1:]),  # a function of the lists: memoised with them
                                lambda: domain_report(memo, self.image_dir, self.domain_match, self.split_path))
        self._data_report = copy.deepcopy(report)  # each job its own (an open-set dataset appends warnings)
        print_domain_report(type(self).__name__, self._data_report)
        return lists["train"], lists["val"], lists["test"]

    def data_report(self) -> dict[str, Any]:
        """For the run record (``data``): per-domain image counts of the split file under the domain rule,
        per-folder counts, and the warnings printed in the log."""
        return dict(getattr(self, "_data_report", {}))

    def _read_checked_lists(self) -> dict[str, list[Datum]]:
        split = read_json(self.split_path)
        for key in ("train", "val", "test"):
            if key not in split:
                raise DataError(f"split file {self.split_path} has no {key!r} list")
        lists = {key: self.read_items(split[key]) for key in ("train", "val", "test")}
        check_split_lists(lists, self.split_path, base=self.image_dir, disjoint=True)
        return lists

    def split_files(self) -> list[str]:
        root = getattr(self, "dataset_root", "")
        if not os.path.isdir(root):
            return []
        return [f for f in sorted(os.listdir(root)) if f.startswith("test_on_") and f.endswith(".json")]

    def domain_of(self, relpath: str) -> tuple[int, str]:
        """Domain index and name of an image path (see ``DATASET.DOMAIN_MATCH`` in the module docstring)."""
        if self.domain_match == "substring":
            for i, d in enumerate(self.domain_list[:-1]):
                if d in relpath:
                    return i, d
            return len(self.domain_list) - 1, self.domain_list[-1]
        parts = relpath.replace("\\", "/").lower().split("/")
        if parts[0] in self.domain_list:
            return self.domain_list.index(parts[0]), parts[0]
        for i, d in enumerate(self.domain_list):
            if d in relpath.lower():
                return i, d
        raise DataError(f"cannot infer the domain of {relpath!r} in {self.split_path} (domains: {self.domain_list})")

    def read_items(self, entries: list[Any]) -> list[Datum]:
        out = []
        for entry in entries:
            try:
                relpath, label, classname = entry[0], int(entry[1]), str(entry[2])
            except (IndexError, TypeError, ValueError):
                raise DataError(f"malformed entry {entry!r} in {self.split_path} "
                                f"(expected [relative_path, label, classname])") from None
            domain, domainname = self.domain_of(relpath)
            out.append(Datum(impath=os.path.join(self.image_dir, relpath), label=label, domain=domain,
                             classname=classname, domainname=domainname))
        return out

    # ---------------------------------------------------------------- sampling
    def sample_train(self, train: list[Datum], num_shots: int, sampler: str) -> list[Datum]:
        if sampler not in FEWSHOT_SAMPLERS:
            raise ConfigError(f"unknown DATASET.FEWSHOT_SAMPLER {sampler!r} ({', '.join(FEWSHOT_SAMPLERS)})")
        if num_shots < 1:
            return train
        if sampler == "per_class_domain":
            return self.generate_fewshot_per_class_domain(train, num_shots=num_shots)
        if sampler == "official" and self.official_sampler == "balance" and num_shots > 4:
            return self.generate_fewshot_dataset_balance(train, num_shots=num_shots)
        return self.generate_fewshot_dataset(train, num_shots=num_shots)


def _copy(d: Datum) -> Datum:
    """``copy.copy(d)`` of a Datum (a new object with the same attributes), four times faster."""
    new = object.__new__(type(d))
    new.__dict__.update(d.__dict__)
    return new


def _folder(impath: str, image_dir: str) -> str:
    """The first folder of ``impath`` below ``image_dir`` (``os.path.relpath``'s answer; a normalised absolute
    path under ``image_dir`` is cut by its prefix, ten times faster)."""
    prefix = image_dir.rstrip("/\\") + os.sep
    if os.path.isabs(image_dir) and impath.startswith(prefix) and os.path.normpath(impath) == impath:
        rel = impath[len(prefix):]
    else:
        rel = os.path.relpath(impath, image_dir)
    return rel.replace("\\", "/").split("/")[0]


def domain_report(lists: dict[str, list[Datum]], image_dir: str, rule: str, split_path: str) -> dict[str, Any]:
    """What the domain rule made of a split file: image counts per domain and per folder for each list, images
    whose rule domain differs from their folder, and classes a domain folder has no image of."""
    by_rule = {s: dict(sorted(Counter(d.domainname for d in items).items())) for s, items in lists.items()}
    by_folder = {s: dict(sorted(Counter(_folder(d.impath, image_dir) for d in items).items()))
                 for s, items in lists.items()}
    moved: Counter = Counter()
    classes: dict[str, set[str]] = {}
    for items in lists.values():
        for d in items:
            folder = _folder(d.impath, image_dir)
            classes.setdefault(folder, set()).add(d.classname)
            if folder.lower() != d.domainname.lower():
                moved[(folder, d.domainname)] += 1
    warnings = []
    total = sum(len(items) for items in lists.values())
    if moved:
        pairs = ", ".join(f"{f} -> {dom}: {n:,}" for (f, dom), n in sorted(moved.items()))
        warnings.append(f"DATASET.DOMAIN_MATCH {rule} assigns {sum(moved.values()):,} of {total:,} images of "
                        f"{os.path.basename(split_path)} to another domain than their folder ({pairs}); "
                        f"DATASET.DOMAIN_MATCH folder keeps the folders' domains")
    every = set().union(*classes.values()) if classes else set()
    for folder in sorted(classes):
        absent = sorted(every - classes[folder])
        if absent:
            warnings.append(f"domain folder {folder} has no images of class(es) {', '.join(absent)} in "
                            f"{os.path.basename(split_path)}")
    return {"split_file": os.path.basename(split_path), "domain_match": rule, "domain_counts": by_rule,
            "folder_counts": by_folder, "warnings": warnings}


def print_domain_report(name: str, report: dict[str, Any]) -> None:
    """The report's counts (one line) and each warning (one line each) in the run's log."""
    counts = "; ".join(f"{split} " + ", ".join(f"{dom} {n:,}" for dom, n in per.items())
                       for split, per in report["domain_counts"].items())
    print(f"{name} domains (DATASET.DOMAIN_MATCH {report['domain_match']}) in {report['split_file']}: {counts}")
    for warning in report["warnings"]:
        print(f"WARNING: {name}: {warning}")


@DATASET_REGISTRY.register()
class PACS(LODODataset):
    """PACS (art_painting, cartoon, photo, sketch; 7 classes). Official sampler: the class-agnostic one."""

    dataset_dir = "PACS"
    domains = ["art_painting", "cartoon", "photo", "sketch"]
    official_sampler = "balance"


@DATASET_REGISTRY.register()
class VLCS(LODODataset):
    """VLCS (caltech, labelme, pascal, sun; 5 classes); folders may be upper-case."""

    dataset_dir = "VLCS"
    domains = ["caltech", "labelme", "pascal", "sun"]
    official_domain_order = ["caltech", "pascal", "labelme", "sun"]
    official_sampler = "plain"


@DATASET_REGISTRY.register()
class DigitsDG(LODODataset):
    """DigitsDG-mini (built by ``python -m demo.data``); domains are the folders of ``images/``."""

    dataset_dir = "DigitsDG"
    domains: list[str] = []
    official_sampler = "balance"
