"""The methods the demo runs: (table label, trainer, trainer config, extra Setup-II driver flags)."""
from __future__ import annotations

from typing import NamedTuple


class Method(NamedTuple):
    label: str
    trainer: str
    cfg: str
    flags: tuple[str, ...] = ()


CROFT_FLAGS = ("--lambda1", "15", "--lambda2", "10", "--ratios", "0.2,0.5", "--gen-step", "1")
METHODS = [
    Method("ZS-CLIP", "ZeroshotCLIP", "demo_digits"),
    Method("CoOp", "CoOp", "demo_digits"),
    Method("CLIP-Adapter", "CLIP_Adapter", "demo_digits"),
    Method("Tip-Adapter-F", "TIP_ADAPTER", "demo_digits"),
    Method("CRoFT", "CRoFT", "demo_digits", CROFT_FLAGS),
    Method("CRoFT (fixed)", "CRoFT", "demo_digits_fixed", CROFT_FLAGS),
]
OOD_SETS = ["FashionMNIST", "Textures"]


def select(names: list[str] | None) -> list[Method]:
    """The methods whose label or trainer is in ``names`` (all when empty); unknown names are an error."""
    if not names:
        return list(METHODS)
    known = {m.label for m in METHODS} | {m.trainer for m in METHODS}
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"error: --methods: unknown {', '.join(bad)} (known: {', '.join(m.label for m in METHODS)})")
    return [m for m in METHODS if m.label in names or m.trainer in names]
