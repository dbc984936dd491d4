"""A tiny fake ImageNet tree (and V2/Sketch/A/R variants) for the Setup-I dataset tests.

``n_classes`` fake classes with wnids ``n9000000k`` and names ``class k`` (sorted by wnid, like CoOp's
``classnames.txt``); 16 px PNGs. ImageNet-A and -R cover only the classes of ``ar_classes`` and hold a
``README.txt`` next to the class folders (as the real downloads do).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import numpy as np
from PIL import Image


def fake_wnid(k: int) -> str:
    return f"n9{k:07d}"


def fake_classname(k: int) -> str:
    return f"class {k}"


def _write_images(folder: str, n: int, seed: int, size: int = 16, prefix: str = "img") -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{prefix}_{i:03d}.png"))


def write_imagenet_tree(root: str, n_classes: int = 20, n_train: int = 5, n_val: int = 6, n_variant: int = 2,
                        ar_classes: Optional[Iterable[int]] = None, variants: bool = True) -> str:
    """Write the Setup-I layout under ``root`` (spec 7.1); returns ``root``."""
    base = os.path.join(root, "imagenet")
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "classnames.txt"), "w", encoding="utf-8") as f:
        for k in range(n_classes):
            f.write(f"{fake_wnid(k)} {fake_classname(k)}\n")
    for k in range(n_classes):
        _write_images(os.path.join(base, "images", "train", fake_wnid(k)), n_train, 10 * k, prefix="train")
        _write_images(os.path.join(base, "images", "val", fake_wnid(k)), n_val, 10 * k + 1, prefix="val")
    if not variants:
        return root
    ar = list(range(0, n_classes, 2)) if ar_classes is None else list(ar_classes)
    v2 = os.path.join(root, "imagenetv2", "imagenetv2-matched-frequency-format-val")
    sketch = os.path.join(root, "imagenet-sketch", "images")
    a_dir = os.path.join(root, "imagenet-adversarial", "imagenet-a")
    r_dir = os.path.join(root, "imagenet-rendition", "imagenet-r")
    for k in range(n_classes):
        _write_images(os.path.join(v2, str(k)), n_variant, 10 * k + 2, prefix="v2")
        _write_images(os.path.join(sketch, fake_wnid(k)), n_variant, 10 * k + 3, prefix="sketch")
    for k in ar:
        _write_images(os.path.join(a_dir, fake_wnid(k)), n_variant, 10 * k + 4, prefix="a")
        _write_images(os.path.join(r_dir, fake_wnid(k)), n_variant, 10 * k + 5, prefix="r")
    for d in (a_dir, r_dir):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "README.txt"), "w", encoding="utf-8") as f:
            f.write("fake README (the real ImageNet-A/R ship one next to the class folders)\n")
    return root
