"""Choosing one setting of a swept method (the CRoFT lambda2 grid) per held-out domain and seed.

``val``: the setting with the best source-domain validation accuracy (training-domain validation, as DomainBed);
``oracle``: the best held-out-domain accuracy (an upper bound, not a result); ``none``: keep every setting.
This is the one place to swap for the protocol collectors' ``--select`` once they exist.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

MODES = ("val", "oracle", "none")


def select(rows: list[dict[str, Any]], mode: str = "val") -> list[dict[str, Any]]:
    """Rows of the chosen setting per (method, domain, seed); ties go to the first planned setting.

    The selected rows keep their setting and get ``selected_by`` = mode (a method with one setting is unchanged).
    """
    if mode not in MODES:
        raise ValueError(f"selection mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return rows
    key_of = {"val": "val_acc", "oracle": "acc"}[mode]
    best: dict[tuple, tuple[float, str]] = {}
    for r in rows:
        k = (r["method"], r["domain"], r["seed"])
        v = r.get(key_of)
        v = float("-inf") if v is None else v
        if k not in best or v > best[k][0]:
            best[k] = (v, r["setting"])
    n_settings = defaultdict(set)
    for r in rows:
        n_settings[r["method"]].add(r["setting"])
    return [dict(r, selected_by=mode if len(n_settings[r["method"]]) > 1 else "")
            for r in rows if best[(r["method"], r["domain"], r["seed"])][1] == r["setting"]]
