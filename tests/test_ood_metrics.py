"""Tests for ``dassl.evaluation.ood`` (metrics) and ``dassl.evaluation.plots`` (scores: ``test_scores.py``).

Parity goldens: ``metrics__*`` arrays of ``croft_reference.npz`` (see the fixture README, section 5).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "CoOp") not in sys.path:
    sys.path.insert(0, str(REPO / "CoOp"))

from dassl.evaluation import ood  # noqa: E402
from dassl.evaluation.plots import plot_score_histograms  # noqa: E402

EXACT = dict(rel=0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# fixture goldens
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    candidates = [
        REPO / "tests" / "fixtures" / "croft_reference.npz",
        REPO.parent / "shared" / "fixtures" / "croft_reference.npz",
    ]
    for path in candidates:
        if path.is_file():
            with np.load(path) as data:
                return {k[len("metrics__") :]: data[k] for k in data.files if k.startswith("metrics__")}
    raise FileNotFoundError(f"croft_reference.npz not found in any of {[str(p) for p in candidates]}")


@pytest.mark.parametrize("suffix", ["", "_idcorrect"])
def test_metric_utils_parity(ref, suffix):
    id_s = ref["id_scores"] if not suffix else ref["id_scores"][ref["id_correct"]]
    ood_s = ref["ood_scores"]
    assert ood.fpr95_tpr_id(id_s, ood_s) == pytest.approx(float(ref["mu_fpr95" + suffix]), **EXACT)
    assert ood.auroc(id_s, ood_s) == pytest.approx(float(ref["mu_auroc" + suffix]), **EXACT)
    assert ood.aupr_in(id_s, ood_s) == pytest.approx(float(ref["mu_aupr" + suffix]), **EXACT)


def test_metric_utils_swapped_parity(ref):
    id_s, ood_s = ref["id_scores"], ref["ood_scores"]
    # metric_utils with the roles swapped (nearest-to-95 % rule, OOD positive); fpr95_tpr_ood is OpenOOD's rule
    assert ood.fpr95_tpr_id(-ood_s, -id_s) == pytest.approx(float(ref["mu_swapped_fpr95"]), **EXACT)
    assert ood.aupr_out(id_s, ood_s) == pytest.approx(float(ref["mu_swapped_aupr"]), **EXACT)
    assert ood.auroc(id_s, ood_s) == pytest.approx(float(ref["mu_swapped_auroc"]), **EXACT)


@pytest.mark.parametrize("suffix", ["", "_idcorrect"])
def test_evaluator_parity(ref, suffix):
    id_s = ref["id_scores"] if not suffix else ref["id_scores"][ref["id_correct"]]
    ood_s = ref["ood_scores"]
    thr = ood.id_threshold_tpr95(id_s)
    assert thr == pytest.approx(float(ref["ev_threshold" + suffix]), **EXACT)
    assert ood.fpr95_id_percentile(ood_s, thr) == pytest.approx(float(ref["ev_fpr95" + suffix]), **EXACT)
    assert ood.auroc(id_s, ood_s) == pytest.approx(float(ref["ev_auroc" + suffix]), **EXACT)


def test_strict_greater_not_ge(ref):
    thr = ood.id_threshold_tpr95(ref["id_scores"])
    ours = ood.fpr95_id_percentile(ref["ood_scores"], thr)
    assert ours != pytest.approx(float(ref["ev_fpr95_if_ge"]), abs=1e-6)


def test_ood_metrics_dict(ref):
    id_s, ood_s = ref["id_scores"], ref["ood_scores"]
    m = ood.ood_metrics(id_s, ood_s)
    assert set(m) == {"auroc", "aupr_in", "aupr_out", "aupr_in_openood", "aupr_out_openood", "fpr95_tpr_id",
                      "fpr95_tpr_ood"}
    assert all(isinstance(v, float) for v in m.values())
    y, s = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))], np.r_[id_s, ood_s]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-9)
    thr = ood.id_threshold_tpr95(id_s)
    m = ood.ood_metrics(id_s, ood_s, threshold=thr)
    assert m["id_threshold"] == thr
    assert m["fpr95_id_percentile"] == pytest.approx(float(ref["ev_fpr95"]), **EXACT)
    assert m["fpr95_tpr_id"] == pytest.approx(float(ref["mu_fpr95"]), **EXACT)
    assert m["aupr_out"] == pytest.approx(float(ref["mu_swapped_aupr"]), **EXACT)


def test_old_metric_names_still_read():
    # records written before the rename carry fpr95_val_threshold / val_threshold
    old = {"fpr95_val_threshold": 0.25, "val_threshold": -0.3, "auroc": 0.9}
    assert ood.metric_value(old, "fpr95_id_percentile") == 0.25 and ood.metric_value(old, "id_threshold") == -0.3
    assert ood.metric_value(old, "fpr95_val_threshold") == 0.25  # an old name asked for is mapped too
    assert ood.metric_value({"fpr95_id_percentile": 0.5}, "fpr95_id_percentile") == 0.5
    assert ood.metric_value(old, "fpr95_tpr_id") is None
    assert ood.canonical_metric("fpr95_val_threshold") == "fpr95_id_percentile"
    assert ood.canonical_metric("fpr95_tpr_ood") == "fpr95_tpr_ood"


# ---------------------------------------------------------------------------------------------------------------
# sklearn cross-checks + independent brute-force FPR95
# ---------------------------------------------------------------------------------------------------------------


def _brute_fpr95_tpr_id(pos: np.ndarray, neg: np.ndarray, level: float = 0.95) -> float:
    """Independent restatement of the Hendrycks rule with O(T * N) threshold sweeps."""
    recalls, fps = [], []
    for t in np.unique(np.concatenate([pos, neg]))[::-1]:
        tp = int(np.sum(pos >= t))
        recalls.append(tp / pos.size)
        fps.append(int(np.sum(neg >= t)))
        if tp == pos.size:
            break
    recalls, fps = recalls[::-1] + [1.0], fps[::-1] + [0]
    best = min(range(len(recalls)), key=lambda i: (abs(recalls[i] - level), i))
    return fps[best] / neg.size


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_random_cross_check(seed, ties):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(5, 400, size=2)
    id_s = rng.normal(1.0, 1.0, n_id)
    ood_s = rng.normal(0.0, 1.2, n_ood)
    if ties:
        id_s, ood_s = np.round(id_s, 1), np.round(ood_s, 1)
    labels = np.r_[np.ones(n_id), np.zeros(n_ood)]
    scores = np.r_[id_s, ood_s]
    assert ood.auroc(id_s, ood_s) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ood.aupr_in(id_s, ood_s) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert ood.aupr_out(id_s, ood_s) == pytest.approx(average_precision_score(1 - labels, -scores), abs=1e-12)
    assert ood.fpr95_tpr_id(id_s, ood_s) == pytest.approx(_brute_fpr95_tpr_id(id_s, ood_s), abs=1e-15)
    assert ood.id_threshold_tpr95(id_s) == np.percentile(id_s, 5)


# ---------------------------------------------------------------------------------------------------------------
# hand-computed cases
# ---------------------------------------------------------------------------------------------------------------


def test_perfect_and_reversed():
    id_s, ood_s = np.array([2.0, 3.0, 2.5]), np.array([0.0, 1.0])
    m = ood.ood_metrics(id_s, ood_s)
    assert m["auroc"] == 1.0 and m["aupr_in"] == 1.0 and m["aupr_out"] == 1.0
    assert m["fpr95_tpr_id"] == 0.0 and m["fpr95_tpr_ood"] == 0.0
    r = ood.ood_metrics(ood_s, id_s)
    assert r["auroc"] == 0.0
    assert r["fpr95_tpr_id"] == 1.0 and r["fpr95_tpr_ood"] == 1.0


def test_all_tied_gives_half():
    assert ood.auroc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5


def test_four_vs_four_by_hand():
    # sorted desc: .9 I, .8 I, .7 O, .5 I, .5 O (tie), .3 I, .2 O, .1 O
    id_s = np.array([0.9, 0.8, 0.5, 0.3])
    ood_s = np.array([0.7, 0.5, 0.2, 0.1])
    # pairs: 4 + 4 + (2 + 0.5 tie) + 2 = 12.5 of 16
    assert ood.auroc(id_s, ood_s) == 12.5 / 16
    # precision at recall .25,.5,.75,1 = 1, 1, 3/5, 4/6
    assert ood.aupr_in(id_s, ood_s) == pytest.approx(0.25 * (1 + 1 + 0.6 + 4 / 6), abs=1e-15)
    # first full recall at t=.3 with fp=2; recall 1 is the closest point to .95 -> 2/4
    assert ood.fpr95_tpr_id(id_s, ood_s) == 0.5
    # OOD positive: full OOD recall first at t=-.7 where 2 ID are >= -> 2/4
    assert ood.fpr95_tpr_ood(id_s, ood_s) == 0.5
    # percentile 5 of [.3,.5,.8,.9]: .3 + 0.15 * .2 = .33
    thr = ood.id_threshold_tpr95(id_s)
    assert thr == pytest.approx(0.33, abs=1e-15)
    assert ood.fpr95_id_percentile(ood_s, thr) == 0.5
    assert ood.fpr95_id_percentile(ood_s, 0.5) == 0.25  # strict '>': the tied 0.5 is not counted


def test_fpr95_first_argmin_quirk():
    # 19 high ID, 4 OOD, 1 very low ID: recall 19/20 = .95 holds at thresholds 11, 3, 2, 1, 0 (fp 0..4).
    # The official code walks thresholds from low to high and takes the FIRST argmin, i.e. the lowest
    # threshold with recall .95 -> fp = 4 of 4 (not the fp = 0 an "optimal" rule would give).
    id_s = np.r_[np.arange(19, 0, -1.0) + 10, -5.0]
    ood_s = np.array([0.0, 1.0, 2.0, 3.0])
    assert ood.fpr95_tpr_id(id_s, ood_s) == 1.0
    # recall 1 (fp 4) is farther from .95 than recall .95; with OOD moved below all ID the answer is 0
    assert ood.fpr95_tpr_id(id_s, ood_s - 10.0) == 0.0


def test_validation_errors():
    with pytest.raises(ValueError, match="empty"):
        ood.auroc([], [1.0])
    with pytest.raises(ValueError, match="empty"):
        ood.ood_metrics([1.0], np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        ood.fpr95_tpr_id([1.0, float("nan")], [0.0])
    with pytest.raises(ValueError, match="NaN"):
        ood.fpr95_id_percentile([0.0], float("nan"))
    with pytest.raises(ValueError, match="1-D"):
        ood.auroc(np.ones((2, 2)), [0.0])


# ---------------------------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------------------------


def test_plot_score_histograms(tmp_path):
    rng = np.random.default_rng(0)
    scores = {
        "ID (source val)": rng.normal(1.0, 1.0, 200),
        "closed-set OOD (held-out domain)": rng.normal(0.5, 1.0, 150),
        "open-set OOD: DTD": rng.normal(0.0, 1.0, 300),
    }
    path = tmp_path / "sub" / "hist.png"
    out = plot_score_histograms(scores, path, title="toy")
    assert Path(out) == path and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["hist.png"]  # no temp file left behind
    with pytest.raises(ValueError):
        plot_score_histograms({}, tmp_path / "empty.png")
