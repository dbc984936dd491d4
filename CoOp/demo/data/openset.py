"""The open-set folders (CoOp split-file layout): Fashion-MNIST test images and scikit-image texture patches."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dassl.utils.tools import sha256_file
from demo.data import render, sources, store
from demo.data.constants import (BUILDER_VERSION, FASHION_CLASSNAMES, FASHION_FOLDER, FASHION_SPLIT, IMAGE_SIZE,
                                 OOD_FRACTIONS, TEXTURE_SOURCES, TEXTURES_FOLDER, TEXTURES_SPLIT)

Render = Callable[[int, int, np.random.Generator], Optional[tuple[np.ndarray, str]]]
PARTS = ("train", "val", "test")


def render_split(tmp: Path, name: str, classnames: list[str], make: Render, per_class: int, seed: int) -> tuple:
    """Write each class's PNGs and split them 50/20/30; returns (split dict, counts per class)."""
    split: dict[str, list] = {p: [] for p in PARTS}
    counts = {}
    for label, cname in enumerate(classnames):
        rng, rels = render.rng_for(seed, name, "render", label), []
        for k in range(per_class):
            got = make(label, k, rng)
            if got is None:
                break
            rel = f"{cname}/{got[1]}"
            store.save_png(got[0], tmp / "images" / rel)
            rels.append(rel)
        order = render.rng_for(seed, name, "split", label).permutation(len(rels))
        part = store.split_of(order, store.split_counts(len(rels), OOD_FRACTIONS), PARTS)
        for j, rel in enumerate(rels):
            split[part[j]].append([rel, label, cname])
        counts[cname] = len(rels)
    return split, counts


def build_openset(root: Path, name: str, split_name: str, classnames: list[str], make: Callable[[], Render],
                  per_class: int, seed: int, extra: dict, log: Callable) -> dict:
    """Build (or verify and reuse) one open-set folder; ``make()`` loads the sources only when building."""
    folder = root / name
    params = {"builder_version": BUILDER_VERSION, "per_class": per_class, "seed": seed}
    if store.manifest_matches(folder, params):
        log(f"[skip] {folder} is up to date (manifest and SHA256SUMS match)")
        return store.read_manifest(folder)
    tmp = store.fresh_tmp(root, name)
    try:
        split, counts = render_split(tmp, name, classnames, make(), per_class, seed)
        store.write_json(split, tmp / split_name)
        sums_sha, images_digest, n_images = store.write_sums(tmp)
        manifest = {
            "name": name, "builder": "CoOp/demo/data (python -m demo.data)", "params": params,
            "layout": f"CoOp split file: images/<class>/*.png + {split_name}", "image_size": IMAGE_SIZE,
            "classnames": classnames, "counts": counts,
            "split_rule": "per class %d/%d/%d %% train/val/test (deterministic)" % tuple(
                int(round(100 * f)) for f in OOD_FRACTIONS),
            "split_sizes": {k: len(v) for k, v in split.items()}, **extra(),
            "versions": sources.versions(), "n_images": n_images, "images_sha256": images_digest,
            "files_sha256": {split_name: sha256_file(str(tmp / split_name))}, "sha256sums_sha256": sums_sha,
        }
        store.write_json(manifest, tmp / "manifest.json")
        store.install(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[built] {folder}")
    return manifest


def build_fashion(root: Path, per_class: int, seed: int, log: Callable) -> dict:
    """``fashion-mnist/``: Fashion-MNIST t10k images, padded to 32 px."""
    loaded: dict = {}

    def make() -> Render:
        fx, fy, loaded["info"] = sources.load_fashion_mnist_test()
        chosen = {lab: np.sort(np.flatnonzero(fy == lab)[render.rng_for(seed, "fashion-pick", lab).permutation(
            int((fy == lab).sum()))][:per_class]) for lab in range(len(FASHION_CLASSNAMES))}

        def one(label: int, k: int, rng: np.random.Generator) -> Optional[tuple[np.ndarray, str]]:
            if k >= len(chosen[label]):
                return None
            i = int(chosen[label][k])
            return render.make_mnist(fx[i]), f"fm{i:05d}.png"
        return one

    def extra() -> dict:
        return {"sources": {"fashion-mnist": loaded["info"]},
                "recipe": "Fashion-MNIST test images, 28 px zero-padded to 32 px, grey to RGB"}
    return build_openset(root, FASHION_FOLDER, FASHION_SPLIT, FASHION_CLASSNAMES, make, per_class, seed, extra, log)


def build_textures(root: Path, per_class: int, seed: int, log: Callable) -> dict:
    """``textures-mini/``: random crops of one scikit-image picture per class."""
    def make() -> Render:
        photos = [sources.photo(lib, name) for _, lib, name in TEXTURE_SOURCES]

        def one(label: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
            img = photos[label]
            lo = max(32, min(img.shape[:2]) // 10)
            return render.random_patch(img, rng, lo, max(lo, min(img.shape[:2]) // 3)), f"tx{k:04d}.png"
        return one

    def extra() -> dict:
        return {"sources": {"scikit-image": {
            "package": "scikit-image (PyPI)", "version": sources.pkg_version("scikit-image"),
            "images": {c: f"{lib}.data.{n}" for c, lib, n in TEXTURE_SOURCES},
            "licence": "per image, see skimage.data docs (public domain / CC0 / CC-BY)"}},
            "recipe": ("random square crops (side min(H,W)/10 .. /3, >= 32 px) of one scikit-image image per "
                       "class, bicubic to 32x32, random h-flip; grey images repeated to RGB")}
    classnames = [c for c, _, _ in TEXTURE_SOURCES]
    return build_openset(root, TEXTURES_FOLDER, TEXTURES_SPLIT, classnames, make, per_class, seed, extra, log)
