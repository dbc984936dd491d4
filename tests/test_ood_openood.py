"""``fpr95_tpr_ood`` / ``aupr_*_openood`` equal OpenOOD v1.5's evaluator; the FPR95 convention per score.

The reference below restates OpenOOD's ``auc_and_fpr_recall`` (openood/evaluators/metrics.py) with scikit-learn:
OOD is the positive class, scores are negated, FPR95 is the FPR of the first ``roc_curve`` point whose TPR is
>= 0.95, and AUPR is ``auc(recall, precision)`` of ``precision_recall_curve``.
"""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics

from dassl.evaluation import ood


def openood(id_s: np.ndarray, ood_s: np.ndarray) -> tuple[float, float, float]:
    conf = np.r_[id_s, ood_s]
    is_ood = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    fpr, tpr, _ = metrics.roc_curve(is_ood, -conf)
    p_in, r_in, _ = metrics.precision_recall_curve(1 - is_ood, conf)
    p_out, r_out, _ = metrics.precision_recall_curve(is_ood, -conf)
    return float(fpr[np.argmax(tpr >= 0.95)]), metrics.auc(r_in, p_in), metrics.auc(r_out, p_out)


def _check(id_s, ood_s):
    fpr, a_in, a_out = openood(np.asarray(id_s, float), np.asarray(ood_s, float))
    assert ood.fpr95_tpr_ood(id_s, ood_s) == fpr
    assert ood.aupr_in_openood(id_s, ood_s) == pytest.approx(a_in, abs=1e-12)
    assert ood.aupr_out_openood(id_s, ood_s) == pytest.approx(a_out, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kind", ["random", "tied", "tiny", "separable", "reversed"])
def test_equals_openood(seed, kind):
    rng = np.random.default_rng(seed)
    n_id, n_ood = (rng.integers(1, 6, size=2) if kind == "tiny" else rng.integers(5, 300, size=2))
    id_s, ood_s = rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.2, n_ood)
    if kind == "tied":
        id_s, ood_s = np.round(id_s), np.round(ood_s)
    if kind == "tiny":
        id_s, ood_s = np.round(id_s, 1), np.round(ood_s, 1)
    if kind == "separable":
        ood_s = ood_s - 20.0
    if kind == "reversed":
        id_s, ood_s = id_s - 20.0, ood_s
    _check(id_s, ood_s)


def test_collinear_points_are_dropped_as_in_sklearn():
    # every threshold adds one ID and one OOD: the ROC curve is the diagonal, sklearn keeps only its ends, so the
    # first point with OOD recall >= .95 is (1, 1): FPR 1.0 (the full curve would give 19/20 at recall 19/20)
    s = np.arange(20.0)
    assert ood.fpr95_tpr_ood(s, s.copy()) == 1.0
    assert ood.fpr95_tpr_id(-s, -s) == 0.95  # Hendrycks' nearest-to-95 % rule (OOD positive) differs
    _check(s, s.copy())


def test_by_hand():
    id_s, ood_s = np.array([0.9, 0.8, 0.5, 0.3]), np.array([0.7, 0.5, 0.2, 0.1])
    # OOD positive on -s: points (tp, fp) = (1,0) (2,0) (2,1) (3,2) (4,2) [(4,3) dropped] (4,4): first tp 4 at fp 2
    assert ood.fpr95_tpr_ood(id_s, ood_s) == 0.5
    # ID positive: (0,1) (.25,1) (.5,1) (.5,2/3) (.75,3/5) (1,4/6) ...: .25 + .25 + 2 * .25 * (2/3 + 3/5) / 2
    assert ood.aupr_in_openood(id_s, ood_s) == pytest.approx(49 / 60, abs=1e-15)
    # average precision of the same curve is lower with the tie at .5
    assert ood.aupr_in(id_s, ood_s) == pytest.approx(0.25 * (1 + 1 + 0.6 + 4 / 6), abs=1e-15)
    # one ID, one OOD, ID higher / lower
    assert ood.fpr95_tpr_ood([1.0], [0.0]) == 0.0 and ood.fpr95_tpr_ood([0.0], [1.0]) == 1.0
    assert ood.aupr_in_openood([1.0], [1.0]) == pytest.approx(0.75)  # (0,1) -> (1, 1/2)


def test_fpr95_convention():
    openood = ("maxlogit", "gen", "temp_msp", "mahalanobis", "vim", "residual")  # OpenOOD v1.5's evaluator
    assert ood.FPR95_CONVENTION == {"energy": "fpr95_id_percentile", "knn": "fpr95_tpr_id",
                                    **{s: "fpr95_tpr_ood" for s in openood}}
    assert ood.fpr95_convention("energy") == "fpr95_id_percentile"
    assert ood.fpr95_convention("knn") == "fpr95_tpr_id"
    assert ood.fpr95_convention("mcm") == "fpr95_tpr_id"
