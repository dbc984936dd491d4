"""OOD scores: one registry, OpenOOD-like. A score is one function registered by name.

Every registered score takes one :class:`ScoreInputs` (the evaluation's logits, features, the ID feature bank,
the trainer's own detection score and the score settings) and returns a 1-D tensor where a HIGHER value means
MORE IN-DISTRIBUTION. Runs (:mod:`dassl.engine.ood_eval`), the KNN sweep, the collectors and the tests all go
through :func:`compute_score`; adding a score is one decorated function here (or in any imported module) plus
its test::

    @register_score("maxlogit", needs=("logits",))
    def maxlogit(inp: ScoreInputs) -> torch.Tensor:
        return inp.logits.max(dim=1).values

The plain tensor functions (:func:`energy_score`, :func:`msp_score`, :func:`mcm_score`, :func:`knn_score`) are
the building blocks; the metrics live in :mod:`dassl.evaluation.ood`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

__all__ = [
    "ScoreInputs",
    "register_score",
    "score_names",
    "missing_inputs",
    "compute_score",
    "compute_scores",
    "energy_score",
    "msp_score",
    "mcm_score",
    "knn_score",
]

INPUT_FIELDS = ("logits", "features", "bank", "score")


@dataclass
class ScoreInputs:
    """What a score may read. Tensors are ``(N, C)`` logits, ``(N, D)`` features, ``(M, D)`` bank, ``(N,)`` score.

    ``score`` is the trainer's own detection score (:class:`dassl.engine.inference.InferenceOutput.score`;
    the energy of the logits unless the trainer sets another one); ``extras`` its further per-image tensors.
    ``logit_scale`` turns logits back into
    cosines for MCM; ``mcm_temperature`` and ``k`` come from ``TEST.MCM_TEMPERATURE`` / ``TEST.KNN_K``.
    """

    logits: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    bank: Optional[torch.Tensor] = None
    score: Optional[torch.Tensor] = None
    logit_scale: float = 100.0
    mcm_temperature: float = 1.0
    k: int = 50
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # InferenceOutput.extras, by name


ScoreFn = Callable[[ScoreInputs], torch.Tensor]


@dataclass(frozen=True)
class _Entry:
    fn: ScoreFn
    needs: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}


def register_score(name: str, needs: Iterable[str] = ("logits",)) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: register ``fn(inputs) -> (N,) tensor`` under ``name``; ``needs`` names the inputs it reads."""
    needs = tuple(needs)
    bad = [n for n in needs if n not in INPUT_FIELDS]
    if bad:
        raise ValueError(f"score {name!r}: unknown input(s) {bad}; choose from {list(INPUT_FIELDS)}")

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in _REGISTRY:
            raise KeyError(f"score {name!r} is already registered")
        _REGISTRY[name] = _Entry(fn, needs)
        return fn

    return deco


def score_names() -> list[str]:
    """Registered score names, in registration order."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown OOD score {name!r}; choose from {score_names()}")
    return _REGISTRY[name]


def missing_inputs(name: str, inputs: ScoreInputs) -> list[str]:
    """The inputs score ``name`` needs that ``inputs`` lacks (empty when it can be computed)."""
    return [n for n in _entry(name).needs if getattr(inputs, n) is None]


def compute_score(name: str, inputs: ScoreInputs) -> np.ndarray:
    """Score ``name`` on ``inputs`` as a float64 numpy array of shape ``(N,)`` (higher = more ID)."""
    missing = missing_inputs(name, inputs)
    if missing:
        raise ValueError(f"score {name!r} needs {', '.join(missing)}")
    out = _REGISTRY[name].fn(inputs)
    if out.dim() != 1:
        raise ValueError(f"score {name!r} returned shape {tuple(out.shape)}, expected (N,)")
    return out.detach().cpu().double().numpy()


def compute_scores(names: Iterable[str], inputs: ScoreInputs) -> dict[str, np.ndarray]:
    """``{name: compute_score(name, inputs)}`` in the order of ``names``."""
    return {name: compute_score(name, inputs) for name in names}


# ------------------------------------------------------------------------------------------------ building blocks


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
    """Negative free energy ``T * logsumexp(logits / T)`` over classes, ``(N,)``. Higher = more ID.

    With ``T = 1`` this is the logsumexp of the logits, as the official CRoFT evaluator computes it (on CLIP
    logits ``s * cos`` with ``s ~ 100``). Padded classes set to ``-inf`` contribute nothing.
    """
    _check_temperature(temperature)
    x = _as_2d_float(logits, "logits")
    return temperature * torch.logsumexp(x / temperature, dim=1)


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability of the (already scaled) logits, ``(N,)`` in ``(0, 1]``. Higher = more ID."""
    x = _as_2d_float(logits, "logits")
    return torch.softmax(x, dim=1).max(dim=1).values


def mcm_score(cosine_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Maximum Concept Matching: max softmax of ``cos / T``, ``(N,)``. Higher = more ID.

    The caller passes the raw image-text cosine similarities (in ``[-1, 1]``), NOT the CLIP logits already
    multiplied by ``logit_scale``; ``T`` is the MCM temperature.
    """
    _check_temperature(temperature)
    x = _as_2d_float(cosine_logits, "cosine_logits")
    return torch.softmax(x / temperature, dim=1).max(dim=1).values


def _l2_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / (x.norm(p=2, dim=1, keepdim=True) + eps)


def _check_knn_args(q: torch.Tensor, b: torch.Tensor, k: int, batch_size: int) -> int:
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"feature dim mismatch: features {q.shape[1]} vs bank {b.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > b.shape[0]:
        raise ValueError(f"k={k} exceeds the size of the ID bank ({b.shape[0]} features)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(k)


def knn_score(features: torch.Tensor, bank: torch.Tensor, k: int, batch_size: int = 1024, squared: bool = True,
              eps: float = 1e-10) -> torch.Tensor:
    """Non-parametric KNN score (Sun et al. 2022): minus the distance to the k-th nearest ID bank feature.

    Both sides are L2-normalised as ``x / (||x|| + eps)``; the search is exact, ``batch_size`` query rows at a
    time. ``squared`` (default) returns minus the SQUARED L2 distance, as faiss ``IndexFlatL2`` in the official
    script (same ranking as the plain distance). ``k > len(bank)`` is an error (faiss silently returned sentinel
    distances there). Returns ``(N,)`` on ``features``' device; higher = more ID.
    """
    q = _as_2d_float(features, "features")
    b = _as_2d_float(bank, "bank").to(device=q.device)
    if q.dtype != b.dtype:
        q, b = q.double(), b.double()
    k = _check_knn_args(q, b, k, batch_size)
    q, b = _l2_normalise(q, eps), _l2_normalise(b, eps)
    b_sq = (b * b).sum(dim=1)
    out = torch.empty(q.shape[0], dtype=q.dtype, device=q.device)
    for start in range(0, q.shape[0], batch_size):
        chunk = q[start : start + batch_size]
        # ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y (clamped: rounding can make it slightly negative)
        d2 = (chunk * chunk).sum(dim=1, keepdim=True) + b_sq.unsqueeze(0) - 2.0 * (chunk @ b.T)
        d2.clamp_(min=0.0)
        out[start : start + chunk.shape[0]] = torch.kthvalue(d2, k, dim=1).values
    return -(out if squared else out.sqrt())


# ------------------------------------------------------------------------------------------------ registered scores


@register_score("energy", needs=("logits",))
def energy(inp: ScoreInputs) -> torch.Tensor:
    """The trainer's detection score: ``logsumexp(logits)`` (energy, T = 1) unless the trainer set its own."""
    return inp.score if inp.score is not None else energy_score(inp.logits)


@register_score("mcm", needs=("logits",))
def mcm(inp: ScoreInputs) -> torch.Tensor:
    """MCM on the cosines ``logits / logit_scale`` at ``mcm_temperature``."""
    return mcm_score(_as_2d_float(inp.logits, "logits") / inp.logit_scale, inp.mcm_temperature)


@register_score("msp", needs=("logits",))
def msp(inp: ScoreInputs) -> torch.Tensor:
    """Maximum softmax probability of the logits."""
    return msp_score(inp.logits)


@register_score("knn", needs=("features", "bank"))
def knn(inp: ScoreInputs) -> torch.Tensor:
    """Minus the squared distance to the ``k``-th nearest bank feature."""
    return knn_score(inp.features, inp.bank, inp.k)
