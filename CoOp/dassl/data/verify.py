"""Start-up image check: the held-out (``test``) and open-set (``ood_test``) images are decoded before any
training, so a truncated or corrupt file stops the run at once, not at its final test.

Each image is decoded in full (JPEGs at 1/8 scale through PIL's ``draft``: every byte of the entropy-coded data
is still read, so truncation is found, for about half the cost of a full decode). Images that decoded are
remembered per folder tree (``<DATASET.ROOT>/<first folder>``, e.g. ``PACS`` or ``dtd``) in
``<cache_root>/image_checks/<tree hash>.json`` keyed by relative path with ``[size, mtime_ns]``, so a second
run only ``stat``s them. ``DATASET.VERIFY_IMAGES False`` skips the check.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any, Iterable, Sequence

from PIL import Image

from ..utils.errors import DataError
from ..utils.filecache import file_version, read_cache, tree_cache_file, update_cache
from .datasets.base_dataset import Datum

CHECKED_SPLITS = ("test", "ood_test")


def check_image(path: str) -> None:
    """Decode ``path`` (JPEG at reduced scale); a file that does not decode is a :class:`DataError` naming it."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise DataError(f"unreadable image {path}: {err} (found by the start-up image check; "
                        f"DATASET.VERIFY_IMAGES False skips it)") from None


def _relative(path: str, base: str) -> str:
    """``os.path.relpath(path, base)`` for absolute ``path`` and ``base``; a normalised path under ``base`` is cut by
    its prefix (ten times faster: a sweep checks tens of thousands of paths per run)."""
    prefix = base.rstrip(os.sep) + os.sep
    if path.startswith(prefix) and os.path.normpath(path) == path and os.path.normpath(base) == base:
        return path[len(prefix):]
    return os.path.relpath(path, base)


def _tree(path: str, root: str) -> str:
    rel = _relative(path, root)
    if rel.startswith(".."):
        return os.path.dirname(path)
    return os.path.join(root, rel.split(os.sep)[0])


def verify_images(paths: Iterable[str], root: str) -> dict[str, int]:
    """Decode every path not already known to decode (see the module docstring); returns counts
    ``{"images", "decoded", "cached"}``. The first bad image raises; what decoded before it is remembered."""
    root = os.path.abspath(root)
    trees: dict[str, list[str]] = defaultdict(list)
    for p in dict.fromkeys(paths):
        trees[_tree(os.path.abspath(p), root)].append(p)
    counts = {"images": 0, "decoded": 0, "cached": 0}
    for tree, items in trees.items():
        cache_file = tree_cache_file("image_checks", tree)
        known, new = read_cache(cache_file), {}
        try:
            for p in items:
                rel = _relative(os.path.abspath(p), tree)
                try:
                    version = file_version(p)
                except FileNotFoundError:
                    raise DataError(f"image not found: {p}") from None
                counts["images"] += 1
                if known.get(rel) == version:
                    counts["cached"] += 1
                    continue
                check_image(p)
                new[rel] = version
                counts["decoded"] += 1
        finally:
            update_cache(cache_file, new, about=f"images under {tree} that decoded: relative path -> "
                                                f"[size, mtime_ns]")
    return counts


def verify_dataset(dataset: Any, root: str, splits: Sequence[str] = CHECKED_SPLITS) -> dict[str, int]:
    """:func:`verify_images` over the given splits of a dataset; prints one line with the counts."""
    t0 = time.time()
    items: list[Datum] = [d for s in splits for d in (getattr(dataset, s, None) or [])]
    counts = verify_images((d.impath for d in items), root)
    if counts["images"]:
        print(f"Image check ({' + '.join(splits)}): {counts['images']:,} images decode ({counts['decoded']:,} "
              f"decoded now, {counts['cached']:,} known from the cache) in {time.time() - t0:.1f} s")
    return counts
