"""Image recipes of the DigitsDG-mini domains (32x32 uint8 RGB) and the seeded generators they use."""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageFilter

from demo.data.constants import IMAGE_SIZE


def rng_for(seed: int, *names: object) -> np.random.Generator:
    """An independent, reproducible generator for (seed, names...)."""
    key = hashlib.sha256(":".join([str(seed)] + [str(n) for n in names]).encode()).digest()
    return np.random.default_rng(int.from_bytes(key[:8], "little"))


def pad28(d: np.ndarray) -> np.ndarray:
    """28x28 -> 32x32 (2 px zero border)."""
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=d.dtype)
    out[2:30, 2:30] = d
    return out


def grey_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, :, None], 3, axis=2).astype(np.uint8)


def make_mnist(d: np.ndarray) -> np.ndarray:
    """A 28 px white-on-black digit, padded to 32 px, grey to RGB."""
    return grey_rgb(pad28(d))


def make_digits8x8(d8: np.ndarray) -> np.ndarray:
    """An 8x8 scikit-learn digit (0..16) scaled to 0..255, bicubic to 20 px, centred on 32 px."""
    g = np.clip(np.round(d8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    g20 = np.asarray(Image.fromarray(g, "L").resize((20, 20), Image.Resampling.BICUBIC))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    out[6:26, 6:26] = g20
    return grey_rgb(out)


def random_patch(img: np.ndarray, rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
    """A random square crop (side lo..hi px) resized to 32 px, randomly mirrored."""
    h, w = img.shape[:2]
    hi = max(lo, min(hi, h, w))
    s = int(rng.integers(lo, hi + 1))
    y0 = int(rng.integers(0, h - s + 1))
    x0 = int(rng.integers(0, w - s + 1))
    crop = img[y0:y0 + s, x0:x0 + s]
    arr = np.asarray(Image.fromarray(crop, "RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def make_photoblend(d: np.ndarray, backgrounds: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """MNIST-M (Ganin & Lempitsky 2015): |background patch - digit| per channel."""
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    patch = random_patch(bg, rng, 32, 128).astype(np.int16)
    digit = pad28(d).astype(np.int16)[:, :, None]
    return np.abs(patch - digit).astype(np.uint8)


def make_inkpaper(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thickened, rotated dark ink on light tinted noisy paper."""
    im = Image.fromarray(pad28(d), "L").filter(ImageFilter.MaxFilter(3))
    angle = float(rng.uniform(-30.0, 30.0))
    im = im.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    alpha = np.asarray(im, dtype=np.float64)[:, :, None] / 255.0
    paper = rng.uniform(185, 255, size=3)
    ink = rng.uniform(0, 90, size=3)
    noise = rng.normal(0.0, 8.0, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    out = paper * (1.0 - alpha) + ink * alpha + noise
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
