"""Fake open-set trees in CoOp's layout (``<folder>/<image subdir>/<class dir>/*.png`` + a zhou split file).

``write_coop_tree`` is generic; ``write_dtd_like`` / ``write_food101_like`` / ``write_caltech101_like`` use the
folder and file names of the real datasets (spec 7.1). The Caltech-like tree mimics CoOp's renaming (folder
``airplanes`` -> class ``airplane``, ``Faces`` -> ``face``) and holds classes excluded by the PACS and VLCS lists
(``dalmatian``, ``airplane``, ``face``, ``chair``, ``emu``) next to kept ones.
"""
from __future__ import annotations

import json
import os
from typing import Sequence, Union

from synthetic import draw_sample

ClassSpec = Union[str, tuple[str, str]]  # class name, or (folder name, class name)

DTD_CLASSES = ("banded", "blotchy", "braided", "bubbly")
FOOD101_CLASSES = ("apple_pie", "baby_back_ribs", "baklava")
CALTECH101_CLASSES: tuple[ClassSpec, ...] = (
    "accordion", ("airplanes", "airplane"), "dalmatian", ("Faces", "face"), "chair", "emu", "elephant", "ketch")


def write_coop_tree(root: str, folder: str, image_subdir: str, split_file: str, classes: Sequence[ClassSpec],
                    counts: tuple[int, int, int] = (4, 2, 3), size: int = 16, style: int = 0) -> str:
    """Write ``<root>/<folder>/<image_subdir>/<dir>/<dir>_<i>.png`` and ``<root>/<folder>/<split_file>``.

    ``counts`` = images per class in (train, val, test); labels = class index. Returns the folder path.
    """
    base = os.path.join(root, folder)
    split: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    for label, spec in enumerate(classes):
        dirname, cname = (spec, spec) if isinstance(spec, str) else spec
        cdir = os.path.join(base, image_subdir, dirname)
        os.makedirs(cdir, exist_ok=True)
        i = 0
        for key, n in zip(("train", "val", "test"), counts):
            for _ in range(n):
                fname = f"{dirname}_{i:04d}.png"
                draw_sample(label, style, i, size).save(os.path.join(cdir, fname))
                split[key].append([f"{dirname}/{fname}", label, cname])
                i += 1
    with open(os.path.join(base, split_file), "w", encoding="utf-8") as f:
        json.dump(split, f)
    return base


def write_dtd_like(root: str, classes: Sequence[ClassSpec] = DTD_CLASSES, counts=(4, 2, 3)) -> str:
    return write_coop_tree(root, "dtd", "images", "split_zhou_DescribableTextures.json", classes, counts, style=1)


def write_food101_like(root: str, classes: Sequence[ClassSpec] = FOOD101_CLASSES, counts=(4, 2, 3)) -> str:
    return write_coop_tree(root, "food-101", "images", "split_zhou_Food101.json", classes, counts, style=2)


def write_caltech101_like(root: str, classes: Sequence[ClassSpec] = CALTECH101_CLASSES, counts=(2, 1, 2)) -> str:
    return write_coop_tree(root, "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", classes,
                           counts, style=3)


def write_all_openset(root: str) -> dict[str, str]:
    """The three open-set trees under ``root``; returns {name: folder}."""
    return {"dtd": write_dtd_like(root), "food-101": write_food101_like(root),
            "caltech-101": write_caltech101_like(root)}


DTD_COUNTS = (60, 24, 36)  # images per class in CoOp's DTD split (train, val, test)


def write_dtd_counts_like(root: str, classes: Sequence[ClassSpec] = DTD_CLASSES[:2],
                          counts: tuple[int, int, int] = DTD_COUNTS) -> str:
    """A DTD-like tree with the per-class counts of CoOp's real DTD split (so K-shot draws really sample)."""
    return write_coop_tree(root, "dtd", "images", "split_zhou_DescribableTextures.json", classes, counts, style=1)
