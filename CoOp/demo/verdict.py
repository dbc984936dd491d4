"""The demo's verdict on the paper's claim, from paired effect sizes with confidence intervals.

The claim: CRoFT is at least as good as the best baseline on held-out accuracy and on energy FPR95. Per metric,
the effect is the mean over (held-out domain, seed) pairs of CRoFT's value minus the best baseline's (the
baseline with the best mean on that metric), with a two-sided Student-t interval (``LEVEL``) of that paired mean.
The effect counts only when the whole interval lies beyond ``MARGIN`` points from zero:

* ``better`` / ``worse``: the interval lies entirely beyond +MARGIN / -MARGIN on CRoFT's better / worse side;
* ``no clear difference``: the interval reaches into [-MARGIN, +MARGIN].

The claim is ``contradicted`` when some metric is ``worse``, ``supported`` when every metric is ``better``, and
``inconclusive`` otherwise. The margin is fixed in advance, in the metrics' own unit (percentage points): one
point is 15 of the 1,500 images of a held-out domain, below which a difference between two fine-tuning methods
is not a finding on a 32-px toy benchmark, whatever CPU computed it.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

MARGIN = 1.0  # percentage points
LEVEL = 0.95
CLAIM_METRICS = (("acc", "held-out accuracy", True), ("energy_fpr95", "energy FPR95", False))
OUTCOMES = ("better", "worse", "no clear difference")


class Effect(NamedTuple):
    """Paired effect of ``ref`` against ``other`` on one metric (``ref`` minus ``other``, in points)."""

    metric: str
    label: str
    higher_better: bool
    ref: str
    other: str
    ref_mean: float
    other_mean: float
    n: int
    mean: float
    sd: float
    lo: float
    hi: float
    outcome: str


def t_interval(diff: Sequence[float], level: float = LEVEL) -> tuple[float, float, float, float]:
    """(mean, sample sd, lower, upper) of the two-sided Student-t interval of the mean of ``diff``; fewer than two
    values give an unbounded interval."""
    d = np.asarray(diff, dtype=float)
    mean = float(d.mean()) if d.size else float("nan")
    if d.size < 2:
        return mean, float("nan"), -math.inf, math.inf
    from scipy.stats import t

    sd = float(d.std(ddof=1))
    half = float(t.ppf(0.5 + level / 2, d.size - 1)) * sd / math.sqrt(d.size)
    return mean, sd, mean - half, mean + half


def outcome(lo: float, hi: float, higher_better: bool, margin: float = MARGIN) -> str:
    """``better``, ``worse`` or ``no clear difference`` for an interval of ``ref - other``."""
    if lo > margin:
        return "better" if higher_better else "worse"
    if hi < -margin:
        return "worse" if higher_better else "better"
    return "no clear difference"


def verdict(outcomes: Sequence[str]) -> str:
    """``contradicted`` if any metric is worse, ``supported`` if all are better, else ``inconclusive``."""
    if not outcomes:
        return "inconclusive"
    if "worse" in outcomes:
        return "contradicted"
    return "supported" if all(o == "better" for o in outcomes) else "inconclusive"


def paired_effect(units_ref: dict, units_other: dict, metric: str, label: str, higher_better: bool, ref: str,
                  other: str, margin: float = MARGIN, level: float = LEVEL) -> Effect:
    """The effect of ``ref`` against ``other`` over their common (domain, seed) units."""
    common = sorted(set(units_ref) & set(units_other))
    a = np.array([units_ref[u] for u in common], dtype=float)
    b = np.array([units_other[u] for u in common], dtype=float)
    mean, sd, lo, hi = t_interval(a - b, level)
    return Effect(metric, label, higher_better, ref, other, float(a.mean()) if a.size else float("nan"),
                  float(b.mean()) if b.size else float("nan"), len(common), mean, sd, lo, hi,
                  outcome(lo, hi, higher_better, margin))


def best_baseline(units: dict[str, dict], baselines: Sequence[str], higher_better: bool) -> Optional[str]:
    """The baseline with the best mean over its units (ties: the first listed)."""
    best: Optional[str] = None
    means = {m: float(np.mean(list(units[m].values()))) for m in baselines if units.get(m)}
    for m, v in means.items():
        if best is None or (v > means[best] if higher_better else v < means[best]):
            best = m
    return best


def claim_effects(units: dict[str, dict[str, dict]], ref: str, baselines: Sequence[str],
                  metrics: Sequence[tuple[str, str, bool]] = CLAIM_METRICS, margin: float = MARGIN,
                  level: float = LEVEL) -> list[Effect]:
    """``units[metric][method][(domain, seed)]`` -> one effect per metric of ``ref`` against the best baseline
    on that metric; metrics without ``ref`` or baselines are left out."""
    out = []
    for metric, label, higher_better in metrics:
        per_method = units.get(metric, {})
        best = best_baseline(per_method, baselines, higher_better)
        if best is None or not per_method.get(ref):
            continue
        out.append(paired_effect(per_method[ref], per_method[best], metric, label, higher_better, ref, best,
                                 margin, level))
    return out


def fmt_effect(e: Effect) -> str:
    """"+1.23 points [95 % CI -0.40, +2.86]" for ``ref - other``."""
    return f"{e.mean:+.2f} points [{100 * LEVEL:.0f} % CI {e.lo:+.2f}, {e.hi:+.2f}]"


def verdict_line(effects: Sequence[Effect], ref: str = "CRoFT", margin: float = MARGIN) -> str:
    """One line that depends only on the outcomes (not on which baseline was best or on the digits)."""
    v = verdict([e.outcome for e in effects]) if len(effects) == len(CLAIM_METRICS) else "inconclusive"
    parts = "; ".join(f"{e.label}: {e.outcome}" for e in effects) or "no finished runs"
    return (f"**Verdict: {v}.** The paper's claim ({ref} ≥ the best baseline on held-out accuracy and ≤ on energy "
            f"FPR95) is {v} on this benchmark ({parts}; an effect counts only when its {100 * LEVEL:.0f} % "
            f"interval excludes zero by {margin:g} point{'s' if margin != 1 else ''}).")


def effects_text(effects: Sequence[Effect]) -> str:
    """The effect sizes behind the verdict, one sentence per metric."""
    out = []
    for e in effects:
        out.append(f"{e.label}: {e.ref} {e.ref_mean:.2f} % vs {e.other_mean:.2f} % for {e.other} (the best "
                   f"baseline on it), {e.ref} − {e.other} = {fmt_effect(e)}, sd {e.sd:.2f} over {e.n} held-out "
                   f"domain x seed pairs: {e.outcome}.")
    return " ".join(out)
