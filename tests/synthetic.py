"""Synthetic image trees for tests: a multi-domain dataset in the PACS layout, separable by class.

Class k is drawn as a coloured shape whose hue and position depend on k; each domain changes the background
and the drawing style, so the task is learnable while domains really differ.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
DEFAULT_CLASSES = ("dog", "elephant", "giraffe")
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128)]


def draw_sample(label: int, domain: int, idx: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(1000 * label + 100 * domain + idx)
    bg = np.clip(rng.normal(40 + 50 * domain, 10, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    color = PALETTE[label % len(PALETTE)]
    jitter = rng.integers(-3, 4, size=2)
    cx = size // 4 + (label % 3) * size // 4 + int(jitter[0])
    cy = size // 2 + int(jitter[1])
    r = size // 5
    box = [cx - r, cy - r, cx + r, cy + r]
    if domain % 2 == 0:
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, outline=color, width=3)
    return img


def write_lodo_tree(root: str, folder: str = "PACS", domains: Sequence[str] = DEFAULT_DOMAINS,
                    classes: Sequence[str] = DEFAULT_CLASSES, per_class: int = 8, val_fraction: float = 0.25,
                    size: int = 32) -> str:
    """Write ``<root>/<folder>/images/<domain>/<class>/*.png`` and one ``test_on_<domain>.json`` per domain."""
    base = os.path.join(root, folder)
    items: dict[str, list[list]] = {d: [] for d in domains}
    for di, dom in enumerate(domains):
        for ci, cname in enumerate(classes):
            d = os.path.join(base, "images", dom, cname)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                fname = f"{cname}_{i:03d}.png"
                draw_sample(ci, di, i, size).save(os.path.join(d, fname))
                items[dom].append([f"{dom}/{cname}/{fname}", ci, cname])
    n_val = max(1, int(round(per_class * val_fraction)))
    for held in domains:
        train, val = [], []
        for dom in domains:
            if dom == held:
                continue
            for ci in range(len(classes)):
                cls_items = [it for it in items[dom] if it[1] == ci]
                val.extend(cls_items[:n_val])
                train.extend(cls_items[n_val:])
        with open(os.path.join(base, f"test_on_{held}.json"), "w", encoding="utf-8") as f:
            json.dump({"train": train, "val": val, "test": items[held]}, f)
    return base
