"""OOD-detection metrics (the scores live in :mod:`dassl.evaluation.scores`).

Conventions
-----------
* **Scores**: every score (see :mod:`dassl.evaluation.scores`) is 1-D where a HIGHER value means MORE
  IN-DISTRIBUTION (ID). The detection metrics below assume the same orientation.
* **Metrics**: numpy (or anything ``np.asarray`` accepts) in, python ``float`` out, values are fractions in
  [0, 1] (not percentages). Each metric name states which class is the positive one:

  ==========================  =================  =====================================================
  name                        positive class     meaning
  ==========================  =================  =====================================================
  ``auroc``                   ID                 ROC AUC, ties count 1/2 (label-agnostic in value)
  ``aupr_in``                 ID                 average precision with ID = 1
  ``aupr_out``                OOD                average precision with OOD = 1 on negated scores
  ``fpr95_tpr_id``            ID                 Hendrycks ``fpr_and_fdr_at_recall``: OOD FPR at the
                                                 ROC point whose ID recall is closest to 0.95
                                                 (MCM / LoCoOp / CRoFT ``metric_utils`` convention)
  ``aupr_in_openood``         ID                 OpenOOD v1.5: trapezoidal area under the PR curve
  ``aupr_out_openood``        OOD                the same with OOD = 1 on negated scores
  ``fpr95_tpr_ood``           OOD                OpenOOD v1.5 evaluator exactly: fraction of ID flagged
                                                 as OOD at the FIRST point of sklearn's ROC curve (OOD
                                                 positive, negated scores, intermediate collinear points
                                                 dropped) whose OOD recall is >= 0.95
  ``fpr95_id_percentile``     ID (threshold)     CRoFT evaluator: fraction of OOD scores STRICTLY above
                                                 the 5th percentile of the ID side's scores (Setup-II:
                                                 correctly classified held-out TEST images; Setup-I: the
                                                 correctly classified val images); that threshold is
                                                 stored as ``id_threshold``
  ==========================  =================  =====================================================

:data:`FPR95_CONVENTION` names the FPR95 each official table used per score (energy: the evaluator's
``OODD_FPR95`` = ``fpr95_id_percentile``; KNN: ``metric_utils`` = ``fpr95_tpr_id``; the scores taken from OpenOOD
v1.5, :data:`OPENOOD_SCORES`: OpenOOD's evaluator = ``fpr95_tpr_ood``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "auroc",
    "aupr_in",
    "aupr_out",
    "aupr_in_openood",
    "aupr_out_openood",
    "fpr95_tpr_id",
    "fpr95_tpr_ood",
    "id_threshold_tpr95",
    "fpr95_id_percentile",
    "METRIC_ALIASES",
    "metric_value",
    "canonical_metric",
    "ood_metrics",
    "FPR95_CONVENTION",
    "OPENOOD_SCORES",
    "fpr95_convention",
]

OPENOOD_SCORES = ("maxlogit", "gen", "temp_msp", "mahalanobis", "vim", "residual")
FPR95_CONVENTION: dict[str, str] = {"energy": "fpr95_id_percentile", "knn": "fpr95_tpr_id",
                                    **{s: "fpr95_tpr_ood" for s in OPENOOD_SCORES}}
"""Score -> the FPR95 its official table reports (energy: evaluator ``OODD_FPR95``; KNN: ``metric_utils``;
OpenOOD v1.5's post-hoc scores: OpenOOD's evaluator, ``fpr95_tpr_ood``)."""


def fpr95_convention(score: str) -> str:
    """The official FPR95 key of a score (scores without an official table: ``fpr95_tpr_id``)."""
    return FPR95_CONVENTION.get(score, "fpr95_tpr_id")


METRIC_ALIASES: dict[str, str] = {"fpr95_val_threshold": "fpr95_id_percentile", "val_threshold": "id_threshold"}
"""Old metric key -> its current name (records written before the rename still collect)."""


def canonical_metric(name: str) -> str:
    """The current name of a metric key (old names of :data:`METRIC_ALIASES` are mapped)."""
    return METRIC_ALIASES.get(name, name)


def metric_value(det: dict[str, Any], key: str) -> Any:
    """``det[key]`` from one score's detection metrics of a record, also under the key's old name; None if absent."""
    key = canonical_metric(key)
    if key in det:
        return det[key]
    return next((det[old] for old, new in METRIC_ALIASES.items() if new == key and old in det), None)

# --------------------------------------------------------------------------------------------------------------
# Metrics (numpy in, float out)
# --------------------------------------------------------------------------------------------------------------


def _as_scores(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains {int(np.isnan(arr).sum())} NaN value(s)")
    return arr


def _binary_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) counts at each distinct score, thresholds descending (``score >= t`` = positive)."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)])
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, is_pos = scores[order], is_pos[order]
    # last position of every tie group
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(is_pos)[last]
    fp = (last + 1) - tp
    return tp, fp


def auroc(id_scores: Any, ood_scores: Any) -> float:
    """Area under the ROC curve with ID as the positive class (ties count 1/2).

    Equals ``sklearn.metrics.roc_auc_score`` with label 1 for ID scores and 0 for OOD scores, i.e.
    ``P(s_id > s_ood) + 0.5 * P(s_id == s_ood)``.
    """
    pos, neg = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    tp, fp = _binary_curve(pos, neg)
    tp = np.r_[0, tp]
    fp = np.r_[0, fp]
    # trapezoid in integer arithmetic: each step adds d_fp * (tp_prev + tp_cur) / 2
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    return twice_area / (2.0 * pos.size * neg.size)


def aupr_in(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with ID as the positive class (AUPR-In).

    Equals ``sklearn.metrics.average_precision_score`` with label 1 for ID: ``sum_n (R_n - R_{n-1}) P_n`` over
    distinct thresholds (step-wise, not interpolated).
    """
    pos, neg = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    tp, fp = _binary_curve(pos, neg)
    precision = tp / (tp + fp)
    recall = tp / pos.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_out(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with OOD as the positive class (AUPR-Out), on negated scores.

    Equals ``sklearn.metrics.average_precision_score`` with label 1 for OOD and scores ``-s``.
    """
    pos, neg = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    return aupr_in(-neg, -pos)


def fpr95_tpr_id(id_scores: Any, ood_scores: Any, recall_level: float = 0.95) -> float:
    """FPR of OOD at ~95 % TPR on ID (ID positive), Hendrycks ``fpr_and_fdr_at_recall`` semantics.

    Reproduces the official ``metric_utils`` computation exactly: one threshold per distinct score (``s >= t``
    counts as ID), cumulative ID count ``tp`` and OOD count ``fp``, ``recall = tp / #ID``; cut at the first
    threshold reaching full recall and reverse (recall decreasing); append the point ``(recall=1, fp=0)``; take
    the FIRST index minimising ``|recall - recall_level|`` and return ``fp / #OOD`` there. No interpolation.
    """
    pos, neg = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    tp, fp = _binary_curve(pos, neg)
    recall = tp / tp[-1]
    full = int(np.searchsorted(tp, tp[-1]))  # first threshold with full recall
    recall = np.r_[recall[full::-1], 1.0]
    fp = np.r_[fp[full::-1], 0]
    best = int(np.argmin(np.abs(recall - recall_level)))
    return float(fp[best] / neg.size)


def _drop_collinear(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sklearn ``roc_curve(drop_intermediate=True)``: keep the ends and every point where the curve bends."""
    if tp.size <= 2:
        return tp, fp
    keep = np.r_[True, np.logical_or(np.diff(fp, 2), np.diff(tp, 2)), True]
    return tp[keep], fp[keep]


def fpr95_tpr_ood(id_scores: Any, ood_scores: Any, recall_level: float = 0.95) -> float:
    """FPR of ID at 95 % TPR on OOD, exactly as OpenOOD v1.5's evaluator (``auc_and_fpr_recall``).

    OOD is the positive class and scores are negated; the ROC curve is sklearn's ``roc_curve`` (one point per
    distinct score, collinear intermediate points dropped, ``(0, 0)`` prepended) and the result is the FPR of
    the FIRST point whose TPR (OOD recall) is ``>= recall_level``: the fraction of ID samples scored at or below
    that threshold.
    """
    pos, neg = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    tp, fp = _drop_collinear(*_binary_curve(-neg, -pos))
    tpr = np.r_[0, tp] / tp[-1]
    fpr = np.r_[0, fp] / fp[-1]
    return float(fpr[int(np.argmax(tpr >= recall_level))])


def _trapezoid_aupr(pos: np.ndarray, neg: np.ndarray) -> float:
    tp, fp = _binary_curve(pos, neg)
    precision = np.r_[1.0, tp / (tp + fp)]
    recall = np.r_[0.0, tp / tp[-1]]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))


def aupr_in_openood(id_scores: Any, ood_scores: Any) -> float:
    """OpenOOD v1.5 AUPR-In: trapezoidal area under sklearn's ``precision_recall_curve`` (ID = 1).

    Unlike :func:`aupr_in` (average precision) the curve is interpolated linearly between its points, starting
    from (recall 0, precision 1); with tied scores the two differ noticeably.
    """
    pos, neg = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    return _trapezoid_aupr(pos, neg)


def aupr_out_openood(id_scores: Any, ood_scores: Any) -> float:
    """OpenOOD v1.5 AUPR-Out: the trapezoidal AUPR with OOD = 1 on negated scores."""
    pos, neg = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    return _trapezoid_aupr(-neg, -pos)


def id_threshold_tpr95(id_scores: Any) -> float:
    """The official evaluator's ID threshold: ``numpy.percentile(id_scores, 5)`` (linear interpolation).

    About 95 % of the given ID scores are ``>= threshold``. The caller passes the ID side's scores: the CORRECTLY
    CLASSIFIED val images in Setup-I (official ``eval_ood_detection``), the correctly classified held-out test
    images in Setup-II (official ``load_ImgFeat``).
    """
    return float(np.percentile(_as_scores(id_scores, "id_scores"), 5))


def fpr95_id_percentile(ood_scores: Any, threshold: float) -> float:
    """Official evaluator FPR95 (``OODD_FPR95``): fraction of OOD scores STRICTLY greater than ``threshold``, the 5th
    percentile of the ID side's scores (:func:`id_threshold_tpr95`)."""
    neg = _as_scores(ood_scores, "ood_scores")
    threshold = float(threshold)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    return float(np.count_nonzero(neg > threshold) / neg.size)


def ood_metrics(id_scores: Any, ood_scores: Any, threshold: float | None = None) -> dict[str, float]:
    """All detection metrics for one (ID, OOD) pair, as fractions in [0, 1].

    Keys: ``auroc``, ``aupr_in``, ``aupr_out``, ``aupr_in_openood``, ``aupr_out_openood``, ``fpr95_tpr_id``,
    ``fpr95_tpr_ood``; and, only when
    ``threshold`` (from :func:`id_threshold_tpr95` on the ID side's scores) is given, ``fpr95_id_percentile`` and
    ``id_threshold`` (old records: ``fpr95_val_threshold`` / ``val_threshold``, read by :func:`metric_value`).
    """
    pos, neg = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    res: dict[str, float] = {
        "auroc": auroc(pos, neg),
        "aupr_in": aupr_in(pos, neg),
        "aupr_out": aupr_out(pos, neg),
        "aupr_in_openood": aupr_in_openood(pos, neg),
        "aupr_out_openood": aupr_out_openood(pos, neg),
        "fpr95_tpr_id": fpr95_tpr_id(pos, neg),
        "fpr95_tpr_ood": fpr95_tpr_ood(pos, neg),
    }
    if threshold is not None:
        res["fpr95_id_percentile"] = fpr95_id_percentile(neg, threshold)
        res["id_threshold"] = float(threshold)
    return res


val_threshold_tpr95 = id_threshold_tpr95  # old names, kept for callers written before the rename
fpr95_val_threshold = fpr95_id_percentile

