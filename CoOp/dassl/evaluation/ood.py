"""OOD-detection scores and metrics: the one module every trainer uses.

Conventions
-----------
* **Scores**: every score function returns a 1-D float tensor where a HIGHER value means MORE
  IN-DISTRIBUTION (ID). Detection metrics below assume the same orientation.
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
  ``fpr95_tpr_ood``           OOD                OpenOOD v1.5 convention: fraction of ID flagged as OOD
                                                 when ~95 % of OOD are caught (= ``fpr95_tpr_id(-ood,
                                                 -id)``)
  ``fpr95_val_threshold``     ID (threshold)     CRoFT evaluator: fraction of OOD scores STRICTLY above
                                                 a threshold taken from ID validation scores
  ==========================  =================  =====================================================
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

__all__ = [
    "energy_score",
    "msp_score",
    "mcm_score",
    "knn_score",
    "SCORE_FUNCTIONS",
    "compute_scores",
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr95_tpr_id",
    "fpr95_tpr_ood",
    "val_threshold_tpr95",
    "fpr95_val_threshold",
    "ood_metrics",
]

# --------------------------------------------------------------------------------------------------------------
# Scores (torch; higher = more ID)
# --------------------------------------------------------------------------------------------------------------


def _as_2d_float(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    x = x.detach()
    # Half-precision logits (s ~ 100) overflow in exp; compute in at least float32.
    if x.dtype != torch.float64:
        x = x.float()
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` over classes. Higher = more ID.

    With ``T = 1`` this is the logsumexp of the logits, exactly as the official CRoFT evaluator computes it
    (on CLIP logits ``s * cos`` with ``s ~ 100``).

    Args:
        logits: ``(N, C)`` class logits.
        temperature: energy temperature ``T > 0``.

    Returns:
        ``(N,)`` float tensor.
    """
    _check_temperature(temperature)
    x = _as_2d_float(logits, "logits")
    return temperature * torch.logsumexp(x / temperature, dim=1)


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability of the logits. Higher = more ID.

    Args:
        logits: ``(N, C)`` class logits (already scaled as the model uses them).

    Returns:
        ``(N,)`` float tensor in ``(0, 1]``.
    """
    x = _as_2d_float(logits, "logits")
    return torch.softmax(x, dim=1).max(dim=1).values


def mcm_score(cosine_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Maximum Concept Matching: max softmax of ``cos / T``. Higher = more ID.

    The caller passes the raw image-text cosine similarities (in ``[-1, 1]``), NOT the CLIP logits that are
    already multiplied by ``logit_scale``; ``T`` plays the role of the MCM temperature.

    Args:
        cosine_logits: ``(N, C)`` cosine similarities.
        temperature: softmax temperature ``T > 0``.

    Returns:
        ``(N,)`` float tensor in ``(0, 1]``.
    """
    _check_temperature(temperature)
    x = _as_2d_float(cosine_logits, "cosine_logits")
    return torch.softmax(x / temperature, dim=1).max(dim=1).values


def _l2_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / (x.norm(p=2, dim=1, keepdim=True) + eps)


def knn_score(
    features: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    batch_size: int = 1024,
    squared: bool = True,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Non-parametric KNN score (Sun et al. 2022): minus the distance to the k-th nearest ID bank feature.

    Both ``features`` and ``bank`` are L2-normalised as ``x / (||x|| + eps)``. The search is exact and is done
    ``batch_size`` query rows at a time, so only a ``(batch_size, len(bank))`` distance block is ever held in
    memory. Higher = more ID.

    Args:
        features: ``(N, D)`` query features.
        bank: ``(M, D)`` ID features (the official script uses the ID validation features).
        k: which neighbour, ``1 <= k <= M`` (``k = 1`` is the nearest).
        batch_size: query rows per distance block.
        squared: if True (default) return minus the SQUARED L2 distance, as faiss ``IndexFlatL2`` does in the
            official script; if False minus the plain L2 distance. The ranking (hence every metric) is the same.
        eps: normalisation epsilon.

    Returns:
        ``(N,)`` float tensor on ``features``' device.

    Raises:
        ValueError: on shape mismatches, an empty bank, or ``k > len(bank)`` (the official faiss code silently
            returned sentinel distances there).
    """
    q = _as_2d_float(features, "features")
    b = _as_2d_float(bank, "bank").to(device=q.device)
    if q.dtype != b.dtype:
        q, b = q.double(), b.double()
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"feature dim mismatch: features {q.shape[1]} vs bank {b.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = int(k)
    if k > b.shape[0]:
        raise ValueError(f"k={k} exceeds the size of the ID bank ({b.shape[0]} features)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    q = _l2_normalise(q, eps)
    b = _l2_normalise(b, eps)
    b_sq = (b * b).sum(dim=1)
    out = torch.empty(q.shape[0], dtype=q.dtype, device=q.device)
    for start in range(0, q.shape[0], batch_size):
        chunk = q[start : start + batch_size]
        # ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y (clamped: rounding can make it slightly negative)
        d2 = (chunk * chunk).sum(dim=1, keepdim=True) + b_sq.unsqueeze(0) - 2.0 * (chunk @ b.T)
        d2.clamp_(min=0.0)
        out[start : start + chunk.shape[0]] = torch.kthvalue(d2, k, dim=1).values
    dist = out if squared else out.sqrt()
    return -dist


SCORE_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "energy": energy_score,
    "msp": msp_score,
    "mcm": mcm_score,
    "knn": knn_score,
}
"""Score name -> function; every function returns a 1-D tensor, higher = more ID."""


def compute_scores(
    logits: torch.Tensor | None,
    features: torch.Tensor | None = None,
    bank: torch.Tensor | None = None,
    names: Iterable[str] = ("energy",),
    *,
    cosine_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    mcm_temperature: float = 1.0,
    k: int = 50,
    batch_size: int = 1024,
) -> dict[str, np.ndarray]:
    """Compute several OOD scores at once (higher = more ID for all of them).

    Args:
        logits: ``(N, C)`` model logits, needed by ``"energy"`` and ``"msp"``.
        features: ``(N, D)`` image features, needed by ``"knn"``.
        bank: ``(M, D)`` ID bank features, needed by ``"knn"``.
        names: which scores to compute, among :data:`SCORE_FUNCTIONS`.
        cosine_logits: ``(N, C)`` cosine similarities, needed by ``"mcm"``.
        temperature: energy temperature.
        mcm_temperature: MCM softmax temperature.
        k: KNN neighbour index.
        batch_size: KNN query batch size.

    Returns:
        ``{name: float64 numpy array of shape (N,)}`` in the order of ``names``.
    """

    def need(value: Any, what: str, name: str) -> Any:
        if value is None:
            raise ValueError(f"score {name!r} needs `{what}`")
        return value

    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "energy":
            s = energy_score(need(logits, "logits", name), temperature)
        elif name == "msp":
            s = msp_score(need(logits, "logits", name))
        elif name == "mcm":
            s = mcm_score(need(cosine_logits, "cosine_logits", name), mcm_temperature)
        elif name == "knn":
            s = knn_score(need(features, "features", name), need(bank, "bank", name), k, batch_size=batch_size)
        else:
            raise ValueError(f"unknown score {name!r}; choose from {sorted(SCORE_FUNCTIONS)}")
        out[name] = s.detach().cpu().double().numpy()
    return out


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


def fpr95_tpr_ood(id_scores: Any, ood_scores: Any, recall_level: float = 0.95) -> float:
    """FPR of ID at ~95 % TPR on OOD (OOD positive; OpenOOD v1.5 convention).

    Defined as ``fpr95_tpr_id(-ood_scores, -id_scores)``: the fraction of ID samples scored as OOD when the
    threshold catches ~95 % of the OOD samples.
    """
    pos, neg = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    return fpr95_tpr_id(-neg, -pos, recall_level)


def val_threshold_tpr95(id_scores: Any) -> float:
    """The official evaluator's ID threshold: ``numpy.percentile(id_scores, 5)`` (linear interpolation).

    About 95 % of the given ID scores are ``>= threshold``. The caller passes only the scores of the CORRECTLY
    CLASSIFIED ID validation samples, as the official ``eval_ood_detection`` does.
    """
    return float(np.percentile(_as_scores(id_scores, "id_scores"), 5))


def fpr95_val_threshold(ood_scores: Any, threshold: float) -> float:
    """Official evaluator FPR95 (ID-derived threshold): fraction of OOD scores STRICTLY greater than it."""
    neg = _as_scores(ood_scores, "ood_scores")
    threshold = float(threshold)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    return float(np.count_nonzero(neg > threshold) / neg.size)


def ood_metrics(id_scores: Any, ood_scores: Any, threshold: float | None = None) -> dict[str, float]:
    """All detection metrics for one (ID, OOD) pair, as fractions in [0, 1].

    Keys: ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95_tpr_id``, ``fpr95_tpr_ood``; and, only when
    ``threshold`` (e.g. from :func:`val_threshold_tpr95` on ID validation scores) is given,
    ``fpr95_val_threshold`` and ``val_threshold``.
    """
    pos, neg = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    res: dict[str, float] = {
        "auroc": auroc(pos, neg),
        "aupr_in": aupr_in(pos, neg),
        "aupr_out": aupr_out(pos, neg),
        "fpr95_tpr_id": fpr95_tpr_id(pos, neg),
        "fpr95_tpr_ood": fpr95_tpr_ood(pos, neg),
    }
    if threshold is not None:
        res["fpr95_val_threshold"] = fpr95_val_threshold(neg, threshold)
        res["val_threshold"] = float(threshold)
    return res

