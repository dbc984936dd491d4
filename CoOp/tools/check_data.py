"""Check a datasets folder before spending GPU hours: which datasets load, their split sizes, and what is missing.

    python tools/check_data.py --root $DATA [--datasets PACS VLCS PACS_DTD ...] [--check-images]

Each dataset is built exactly as ``train.py`` builds it (same classes, same config defaults, the same warnings,
e.g. a class missing from a domain); leave-one-domain-out datasets are built once per ``test_on_<domain>.json``.
Failures print the one-line error that a run would print (naming the missing path and what belongs there).
``--check-images`` also decodes every image. Without ``--datasets`` every known dataset is tried and those whose
top folder is absent from the root are listed as not present; exit code 0 when every dataset that is present
(or, with ``--datasets``, every dataset asked for) loads, else 1.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from typing import Optional, Sequence

COOP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, COOP_DIR)

import datasets  # noqa: E402,F401
from dassl.config import get_cfg_default  # noqa: E402
from dassl.data.data_manager import read_image  # noqa: E402
from dassl.data.datasets import DATASET_REGISTRY  # noqa: E402
from dassl.utils.errors import UserError  # noqa: E402

DEFAULT = ["PACS", "VLCS", "PACS_DTD", "PACS_Food101", "PACS_Caltech101", "VLCS_DTD", "VLCS_Food101",
           "VLCS_Caltech101", "ImageNet46", "ImageNetOOD46"]


def variants(name: str) -> list[tuple[str, dict]]:
    """(label, config overrides) to build for a dataset."""
    cls = DATASET_REGISTRY.get(name)
    if name == "ImageNetOOD46":
        return [(f"{name} [{t}]", {"TEST_OOD": t}) for t in
                ("test_id", "imagenet_v2", "imagenet_s", "imagenet_a", "imagenet_r")]
    if name == "ImageNet46":
        return [(name, {"DATASET.NUM_SHOTS": 16})]
    domains = getattr(cls, "domains", None)
    if domains is not None and hasattr(cls, "read_lodo_splits"):
        doms = list(domains) or ["?"]
        return [(f"{name} [test_on_{d}]", {"TEST_ENV": d, "DATASET.NUM_SHOTS": 16}) for d in doms]
    return [(name, {})]


def check(root: str, name: str, overrides: dict, open_images: bool) -> str:
    cfg = get_cfg_default()
    cfg.DATASET.ROOT = root
    cfg.DATASET.NAME = name
    cfg.VERBOSE = False
    cfg.SEED = 1
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    import random

    random.seed(1)
    ds = DATASET_REGISTRY.get(name)(cfg)
    sizes = {k: len(getattr(ds, k)) for k in ("train_x", "val", "test", "ood_test")}
    if open_images:
        for split in ("train_x", "val", "test", "ood_test"):
            for item in getattr(ds, split):
                read_image(item.impath)
    return f"{ds.num_classes} classes; " + ", ".join(f"{k} {v:,}" for k, v in sizes.items() if v)


def build_quietly(root: str, name: str, overrides: dict, open_images: bool) -> tuple[str, list[str]]:
    """:func:`check` with the dataset's log captured: (summary, the WARNING lines a run would log)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = check(root, name, overrides, open_images)
    return summary, [ln for ln in buf.getvalue().splitlines() if ln.startswith("WARNING")]


def absent_folder(root: str, err: Exception) -> str:
    """The top folder under ``root`` that the error's missing path lies in, when that folder is absent
    (the dataset is not there at all, e.g. no ImageNet); "" when the dataset is there but broken."""
    for word in str(err).replace("(", " ").replace(")", " ").replace(",", " ").split():
        if word.startswith(root + os.sep):
            top = os.path.join(root, os.path.relpath(word, root).split(os.sep)[0])
            if not os.path.exists(top):
                return top
    return ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.environ.get("DATA", ""), help="datasets folder (default: $DATA)")
    p.add_argument("--datasets", nargs="+", default=None,
                   help="datasets that must load (default: every known one that is present under the root)")
    p.add_argument("--check-images", action="store_true", help="open every image (slow on ImageNet)")
    args = p.parse_args(argv)
    if not args.root:
        print("error: no data root: pass --root DIR or set DATA=DIR", file=sys.stderr)
        return 2
    root = os.path.abspath(os.path.expanduser(args.root))
    failed, absent = 0, {}
    for name in args.datasets or DEFAULT:
        try:
            builds = variants(name)
        except UserError as err:
            print(f"[FAIL] {name}: {err}")
            failed += 1
            continue
        last_error = ""
        for label, overrides in builds:
            try:
                summary, warnings = build_quietly(root, name, overrides, args.check_images)
                print(f"[ ok ] {label}: {summary}" + "".join(f"\n       {w}" for w in warnings))
            except UserError as err:
                if args.datasets is None and absent_folder(root, err):
                    absent[name] = absent_folder(root, err)
                    break
                failed += 1
                if str(err) == last_error:  # the same cause (e.g. a missing folder): say it once
                    continue
                last_error = str(err)
                print(f"[FAIL] {label}: {err}")
    for name, folder in absent.items():
        print(f"[ -- ] {name}: not present ({folder} does not exist)")
    if absent:
        print("(datasets that are not present are not checked; name them with --datasets to require them)")
    done = "all datasets load" if args.datasets else "all datasets present load"
    print(f"\n{failed} failed" if failed else f"\n{done}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
