"""Dassl transform names -> torchvision pipelines.

Train: the ops listed in ``INPUT.TRANSFORMS`` in order (``random_resized_crop``, ``random_crop``,
``random_flip``, ``center_crop``, ``normalize``); a plain resize is added when no crop op is listed.
Test: resize the shorter side to ``max(INPUT.SIZE)`` -> center crop ``INPUT.SIZE`` -> tensor -> normalize.
"""
from __future__ import annotations

from typing import Any

from ..utils.errors import ConfigError

AVAILABLE_TRANSFORMS = ("random_resized_crop", "random_crop", "random_flip", "center_crop", "normalize")

# INPUT.INTERPOLATION -> torchvision's InterpolationMode member (torchvision is imported on first use: importing it
# costs about 2 s of CPU, which a sweep driver that only resolves configs does not pay)
INTERPOLATION_MODES = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST"}


def build_transform(cfg: Any, is_train: bool = True) -> Any:
    """Build the train or test transform of ``cfg.INPUT`` (a ``torchvision.transforms.Compose``)."""
    import torchvision.transforms as T

    choices = list(cfg.INPUT.TRANSFORMS)
    for name in choices:
        if name not in AVAILABLE_TRANSFORMS:
            raise ConfigError(f"unknown transform {name!r} in INPUT.TRANSFORMS (available: "
                              f"{', '.join(AVAILABLE_TRANSFORMS)})")
    if cfg.INPUT.INTERPOLATION not in INTERPOLATION_MODES:
        raise ConfigError(f"unknown INPUT.INTERPOLATION {cfg.INPUT.INTERPOLATION!r}")
    interp = getattr(T.InterpolationMode, INTERPOLATION_MODES[cfg.INPUT.INTERPOLATION])
    size = tuple(cfg.INPUT.SIZE)
    normalize = T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD)
    ops: list[Any] = []
    if is_train:
        if "random_resized_crop" not in choices and "random_crop" not in choices:
            ops.append(T.Resize(size, interpolation=interp))
        for name in choices:
            if name == "random_resized_crop":
                ops.append(T.RandomResizedCrop(size, scale=tuple(cfg.INPUT.RRCROP_SCALE), interpolation=interp))
            elif name == "random_crop":
                ops.append(T.Resize(size, interpolation=interp))
                ops.append(T.RandomCrop(size, padding=cfg.INPUT.CROP_PADDING))
            elif name == "random_flip":
                ops.append(T.RandomHorizontalFlip())
            elif name == "center_crop":
                ops.append(T.CenterCrop(size))
    else:
        ops.append(T.Resize(max(size), interpolation=interp))
        ops.append(T.CenterCrop(size))
    ops.append(T.ToTensor())
    if "normalize" in choices:
        ops.append(normalize)
    return T.Compose(ops)
