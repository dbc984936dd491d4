"""Value ranges of config keys: a value outside its range is one line naming the key and the accepted range.

``ENGINE_RANGES`` covers the engine keys of :mod:`dassl.config.defaults`; each trainer adds its own as a class
attribute ``CFG_RANGES`` (full key -> :class:`Range`), e.g.::

    CFG_RANGES = {"TRAINER.CRoFT.ratio": unit(), "TRAINER.CRoFT.lambda1": nonneg(), "TRAINER.CRoFT.PREC": PREC}

:func:`validate_cfg` checks the engine keys and the ranges of the trainer named in ``TRAINER.NAME``. Lists and
tuples of numbers (``INPUT.SIZE``, ``OPTIM.STEPSIZE``) are checked element by element. Keys absent from the
config are skipped. Every numeric key of the defaults and of every registered trainer node must have a range
(``tests/test_config_ranges.py`` fails otherwise).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..utils.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Accepted values: a number in ``[lo, hi]`` (open ends optional), optionally integer, or one of ``choices``."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    choices: tuple = ()
    pattern: str = ""
    note: str = ""

    def accepts(self, value: Any) -> bool:
        if self.choices or self.pattern:
            text = str(value)
            return text in self.choices or bool(self.pattern and re.fullmatch(self.pattern, text))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not (isinstance(value, int) or float(value).is_integer()):
            return False
        if not math.isfinite(float(value)):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))

    def describe(self) -> str:
        if self.choices or self.pattern:
            opts = list(self.choices) + ([self.note] if self.pattern and self.note else [])
            tail = f" ({self.note})" if self.note and not self.pattern else ""
            return "one of " + ", ".join(opts) + tail
        kind = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            span = f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
            text = f"{kind} in {span}"
        elif self.lo is not None:
            text = f"{kind} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            text = f"{kind} {'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            text = kind
        return text + (f" ({self.note})" if self.note else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def unit(note: str = "") -> Range:
    """A ratio or probability: ``[0, 1]``."""
    return Range(0.0, 1.0, note=note)


def nonneg(note: str = "") -> Range:
    """A weight (λ, decay, ...): ``>= 0``."""
    return Range(0.0, note=note)


def positive(note: str = "") -> Range:
    """A learning rate, temperature or scale: ``> 0`` and finite."""
    return Range(0.0, lo_open=True, note=note)


def count(lo: int = 1, note: str = "") -> Range:
    """An integer ``>= lo`` (epochs, batch sizes, shots, ...)."""
    return Range(float(lo), integer=True, note=note)


PRECISION_NAMES = ("fp32", "fp16", "amp", "bf16")
PREC = Range(choices=PRECISION_NAMES, note="CPU always runs fp32")
DEVICE = Range(choices=("auto", "cpu", "cuda"), pattern=r"cuda:\d+", note="cuda:N")

ENGINE_RANGES: dict[str, Range] = {
    "VERSION": count(1),
    "SEED": Range(integer=True, note="< 0: no seeding"),
    "DEVICE": DEVICE,
    "MODEL.BACKBONE.LOCAL_FEATURES": Range(choices=("value", "tokens"), note="tokens: ViT only"),
    "INPUT.SIZE": count(1),
    "INPUT.PIXEL_MEAN": unit(),
    "INPUT.PIXEL_STD": positive(),
    "INPUT.CROP_PADDING": count(0),
    "INPUT.RRCROP_SCALE": Range(0.0, 1.0, lo_open=True),
    "DATASET.NUM_SHOTS": count(-1, "-1 or 0: all images; K: K-shot"),
    "DATASET.ID_PER_CLASS_CAP": count(-1, "< 1: no cap"),
    "DATASET.OPENSET_DRAW_ORDER": Range(choices=("official", "id_first"), note="id_first: named deviation"),
    "DATASET.SETUP1_OOD_SIZE": count(-1, "< 1: all images"),
    "DATASET.OOD_PER_CLASS_CAP": count(-1, "< 1: no cap"),
    "DATALOADER.NUM_WORKERS": count(0),
    "DATALOADER.TRAIN_X.BATCH_SIZE": count(1),
    "DATALOADER.TEST.BATCH_SIZE": count(1),
    "FEATURE_CACHE.TRAIN_VIEWS": count(1),
    "OPTIM.LR": positive(),
    "OPTIM.WEIGHT_DECAY": nonneg(),
    "OPTIM.MOMENTUM": unit(),
    "OPTIM.SGD_DAMPNING": unit(),
    "OPTIM.ADAM_BETA1": Range(0.0, 1.0, hi_open=True),
    "OPTIM.ADAM_BETA2": Range(0.0, 1.0, hi_open=True),
    "OPTIM.STEPSIZE": count(-1, "< 1: the whole run"),
    "OPTIM.GAMMA": Range(0.0, 1.0, lo_open=True),
    "OPTIM.MAX_EPOCH": count(1),
    "OPTIM.WARMUP_EPOCH": count(-1, "< 1: no warm-up"),
    "OPTIM.WARMUP_CONS_LR": nonneg(),
    "OPTIM.WARMUP_MIN_LR": nonneg(),
    "TRAIN.CHECKPOINT_FREQ": count(0, "0: the rolling last checkpoint only"),
    "TRAIN.PRINT_FREQ": count(1),
    "TEST.KNN_K": count(1),
    "TEST.MCM_TEMPERATURE": positive(),
    "TEST.GEN_GAMMA": positive(),
    "TEST.GEN_M": count(1),
    "TEST.VIM_DIM": count(1, "< the image feature dimension"),
    "TEST.RESIDUAL_DIM": count(1, "< the image feature dimension"),
}


def lookup(cfg: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_ranges(cfg: Mapping[str, Any], ranges: Mapping[str, Range]) -> None:
    """Raise :class:`ConfigError` for the first key whose value (or list element) is out of range."""
    for key, rng in ranges.items():
        found, value = lookup(cfg, key)
        if not found:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if not rng.accepts(v):
                raise ConfigError(f"{key} = {value!r} is out of range: expected {rng.describe()}")


def trainer_ranges(cfg: Mapping[str, Any]) -> Mapping[str, Range]:
    """``CFG_RANGES`` of the trainer named in ``TRAINER.NAME`` (empty if it declares none)."""
    from ..engine import TRAINER_REGISTRY

    name = cfg["TRAINER"]["NAME"]
    if not name or name not in TRAINER_REGISTRY:
        return {}
    return getattr(TRAINER_REGISTRY.get(name), "CFG_RANGES", {}) or {}


def validate_cfg(cfg: Mapping[str, Any]) -> None:
    """Engine ranges, then the active trainer's ranges."""
    check_ranges(cfg, ENGINE_RANGES)
    check_ranges(cfg, trainer_ranges(cfg))
