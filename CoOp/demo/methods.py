"""The methods the demo runs: (table label, trainer, trainer config, extra Setup-II driver flags)."""
from __future__ import annotations

from typing import NamedTuple


class Method(NamedTuple):
    label: str
    trainer: str
    cfg: str
    flags: tuple[str, ...] = ()
    local: bool = False  # the model yields local image features: its evaluation adds the GL-MCM score
    train_local: bool = False  # its training reads local image features (trained first: one cache pass)


LAMBDA2_GRID = ("1", "10", "100")  # selected per held-out domain and seed on source-domain val accuracy
LAMBDA2_GRID_FULL = ("0", "1", "10", "100", "1000")  # the official PACS grid


def croft_flags(grid: tuple[str, ...]) -> tuple[str, ...]:
    return ("--lambda1", "15", "--lambda2", *grid, "--ratios", "0.2,0.5", "--gen-step", "1")


METHODS = [
    Method("ZS-CLIP", "ZeroshotCLIP", "demo_digits", local=True),
    Method("CoOp", "CoOp", "demo_digits", local=True),
    Method("CLIP-Adapter", "CLIP_Adapter", "demo_digits"),
    Method("Tip-Adapter-F", "TIP_ADAPTER", "demo_digits"),
    Method("DPLCLIP", "DPLCLIP", "demo_digits"),
    Method("BCAL", "BCAL", "demo_digits"),
    Method("LoCoOp", "LoCoOp", "demo_digits", local=True, train_local=True),
    Method("CRoFT", "CRoFT", "demo_digits", croft_flags(LAMBDA2_GRID), local=True),
    Method("CRoFT (fixed)", "CRoFT", "demo_digits_fixed", croft_flags(("10",)), local=True),  # grid in --full
]
FULL_ONLY = [Method("CoCoOp", "CoCoOp", "demo_digits")]  # per-image prompts: too slow for the 5-minute demo
OOD_SETS = ["FashionMNIST", "Textures"]


def local_scores() -> list[str]:
    """``TEST.OOD_SCORES`` of a method with local features: the default scores plus ``gl_mcm``."""
    from dassl.config import get_cfg_default

    return [*get_cfg_default().TEST.OOD_SCORES, "gl_mcm"]


def full(methods: list[Method]) -> list[Method]:
    """The ``--full`` variant: CoCoOp added and both CRoFT variants over the official lambda2 grid."""
    out = [m._replace(flags=croft_flags(LAMBDA2_GRID_FULL)) if m.trainer == "CRoFT" else m for m in methods]
    return out[:4] + FULL_ONLY + out[4:]


def select(names: list[str] | None, is_full: bool = False) -> list[Method]:
    """The methods whose label or trainer is in ``names`` (all when empty); unknown names are an error."""
    pool = full(METHODS) if is_full else list(METHODS)
    if not names:
        return pool
    known = {m.label for m in pool} | {m.trainer for m in pool}
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"error: --methods: unknown {', '.join(bad)} (known: {', '.join(m.label for m in pool)})")
    return [m for m in pool if m.label in names or m.trainer in names]
