"""The demo's verdict rule (CoOp/demo/verdict.py) on constructed inputs: the Student-t interval against scipy and
hand computation, every branch of the per-metric outcome and of the verdict, the choice of the best baseline,
and a verdict line that names no baseline and no digits (so other CPUs' rows give the same line)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from demo import report, verdict


def test_t_interval_matches_hand_computation_and_scipy():
    from scipy import stats

    # d = 1..5: mean 3, sd sqrt(2.5), t(0.975, 4) = 2.7764451 -> half width 2.7764451 * sqrt(2.5) / sqrt(5)
    mean, sd, lo, hi = verdict.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert (mean, sd) == (pytest.approx(3.0), pytest.approx(math.sqrt(2.5)))
    assert (lo, hi) == (pytest.approx(3.0 - half, abs=1e-12), pytest.approx(3.0 + half, abs=1e-12))
    d = np.random.default_rng(0).normal(1.0, 2.0, size=20)
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert verdict.t_interval(d)[2:] == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    assert verdict.t_interval([4.0])[2:] == (-math.inf, math.inf)  # one pair: nothing can be concluded


@pytest.mark.parametrize("lo,hi,higher_better,expected", [
    (1.5, 3.0, True, "better"),            # accuracy: whole interval above +1
    (-3.0, -1.2, True, "worse"),           # accuracy: whole interval below -1
    (0.5, 3.0, True, "no clear difference"),  # reaches into [-1, 1]
    (1.0, 3.0, True, "no clear difference"),  # touching the margin is not beyond it
    (-3.0, -1.5, False, "better"),         # FPR95: lower is better
    (1.2, 4.0, False, "worse"),
    (-0.5, 0.5, False, "no clear difference"),
])
def test_outcome_branches(lo, hi, higher_better, expected):
    assert verdict.outcome(lo, hi, higher_better, margin=1.0) == expected


@pytest.mark.parametrize("outcomes,expected", [
    (["better", "better"], "supported"),
    (["better", "worse"], "contradicted"),
    (["no clear difference", "worse"], "contradicted"),
    (["better", "no clear difference"], "inconclusive"),
    (["no clear difference", "no clear difference"], "inconclusive"),
    ([], "inconclusive"),
])
def test_verdict_branches(outcomes, expected):
    assert verdict.verdict(outcomes) == expected


def _rows(acc_gain: float, fpr_gain: float, noise: float, seed: int = 0, best: str = "B1") -> list[dict]:
    """CRoFT and two baselines on 4 domains x 5 seeds; CRoFT = ``best`` + gain (+ noise); the other baseline is
    2 points worse than ``best`` on both metrics."""
    rng = np.random.default_rng(seed)
    rows = []
    for dom in ("a", "b", "c", "d"):
        for s in range(1, 6):
            base_acc, base_fpr = 70.0 + rng.normal(0, 3), 50.0 + rng.normal(0, 3)
            vals = {best: (base_acc, base_fpr), ("B2" if best == "B1" else "B1"): (base_acc - 2, base_fpr + 2),
                    "CRoFT": (base_acc + acc_gain + rng.normal(0, noise), base_fpr - fpr_gain + rng.normal(0, noise))}
            for method, (acc, fpr) in vals.items():
                rows.append({"method": method, "domain": dom, "seed": s, "setting": "", "ood": "F",
                             "acc": acc, "energy_fpr95": fpr})
    return rows


@pytest.mark.parametrize("acc_gain,fpr_gain,expected", [
    (3.0, 4.0, "supported"),      # better by more than the margin on both
    (3.0, -4.0, "contradicted"),  # FPR95 worse by more than the margin
    (0.0, 0.0, "inconclusive"),   # no difference
    (3.0, 0.5, "inconclusive"),   # one better, one within the margin
])
def test_claim_effects_on_constructed_rows(acc_gain, fpr_gain, expected):
    rows = _rows(acc_gain, fpr_gain, noise=0.5)
    effects = verdict.claim_effects(report.claim_units(rows), "CRoFT", report.baselines(rows))
    assert [e.other for e in effects] == ["B1", "B1"] and all(e.n == 20 for e in effects)
    diffs = {"acc": acc_gain, "energy_fpr95": -fpr_gain}
    for e in effects:  # the noise is N(0, 0.5): the mean difference is within 4 standard errors of the gain
        assert e.mean == pytest.approx(diffs[e.metric], abs=4 * 0.5 / math.sqrt(20))
        assert e.lo < e.mean < e.hi
    assert verdict.verdict([e.outcome for e in effects]) == expected
    assert f"**Verdict: {expected}.**" in report.summary(rows)


def test_verdict_line_does_not_depend_on_which_baseline_is_best():
    """Two benchmarks whose best baseline differs (B1 vs B2) and whose numbers differ, same outcomes: same line."""
    a = verdict.claim_effects(report.claim_units(r := _rows(3.0, 0.0, 0.5, seed=1)), "CRoFT", report.baselines(r))
    b = verdict.claim_effects(report.claim_units(r := _rows(3.2, 0.1, 0.5, seed=2, best="B2")), "CRoFT",
                              report.baselines(r))
    assert {e.other for e in a} == {"B1"} and {e.other for e in b} == {"B2"}
    assert a[0].mean != b[0].mean
    assert verdict.verdict_line(a) == verdict.verdict_line(b)
    assert "B1" not in verdict.verdict_line(a) and "B1" in verdict.effects_text(a)


def test_best_baseline_by_direction_and_first_on_ties():
    units = {"X": {("a", 1): 1.0}, "Y": {("a", 1): 3.0}, "Z": {("a", 1): 3.0}}
    assert verdict.best_baseline(units, ["X", "Y", "Z"], higher_better=True) == "Y"
    assert verdict.best_baseline(units, ["X", "Y", "Z"], higher_better=False) == "X"
    assert verdict.best_baseline(units, ["W"], higher_better=True) is None
