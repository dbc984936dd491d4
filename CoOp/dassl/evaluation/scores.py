"""OOD scores: one registry, OpenOOD-like. A score is one function registered by name.

Every registered score takes one :class:`ScoreInputs` (the evaluation's logits, features, the ID feature bank,
the trainer's own detection score and the score settings) and returns a 1-D tensor where a HIGHER value means
MORE IN-DISTRIBUTION. Runs (:mod:`dassl.engine.ood_eval`), the KNN sweep, the collectors and the tests all go
through :func:`compute_score`; adding a score is one decorated function here (or in any imported module) plus
its test::

    @register_score("my_maxlogit", needs=("logits",))
    def my_maxlogit(inp: ScoreInputs) -> torch.Tensor:
        return inp.logits.max(dim=1).values

The plain tensor functions (:func:`energy_score`, :func:`msp_score`, :func:`mcm_score`, :func:`knn_score`,
:func:`l_mcm_score`, :func:`gl_mcm_score`) are the building blocks; the metrics live in :mod:`dassl.evaluation.ood`.

**Local scores.** A score that reads the trainer's local logits (``InferenceOutput.local_logits``, B x R x C per
batch, :mod:`clip_backbone.local` regions; ``gl_mcm``, ``l_mcm``) registers ``needs=(..., "local_logits")`` and
``reduce_local=fn``: ``fn(local_logits, settings) -> (B,)`` per-image tensor, run on every batch as it is
collected (:func:`reduce_local`; a reducer shared by several scores runs once), so an evaluation keeps O(images)
numbers, never the N x R x C logits. The score reads its reduction as ``inputs.local[name]``.

**Fitted scores.** A score that needs statistics of the ID training split (class means, a subspace, a temperature)
registers ``fit=fn`` with ``fit_needs`` (what ``fn`` reads of the training split: ``logits``, ``features``,
``labels``). The evaluator calls :func:`fit_score` once per model on the training split's :class:`ScoreInputs` and
passes the result to every evaluation split in ``ScoreInputs.fitted[name]``; never fitted on evaluation data.
OpenOOD v1.5's post-hoc scores (MaxLogit, GEN, temperature-scaled MSP, Mahalanobis, ViM, Residual) live in
:mod:`dassl.evaluation.openood_scores`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

__all__ = [
    "ScoreInputs",
    "register_score",
    "score_names",
    "missing_inputs",
    "compute_score",
    "compute_scores",
    "fit_needs",
    "fit_score",
    "energy_score",
    "msp_score",
    "mcm_score",
    "knn_score",
    "l_mcm_score",
    "gl_mcm_score",
    "max_local_softmax",
    "reduce_local",
    "score_needs",
]

INPUT_FIELDS = ("logits", "features", "bank", "score", "local_logits")
FIT_FIELDS = ("logits", "features", "labels")  # what a fit may read of the training split


@dataclass
class ScoreInputs:
    """What a score may read. Tensors are ``(N, C)`` logits, ``(N, D)`` features, ``(M, D)`` bank, ``(N,)`` score.

    ``score`` is the trainer's own detection score (:class:`dassl.engine.inference.InferenceOutput.score`;
    the energy of the logits unless the trainer sets another one); ``extras`` its further per-image tensors.
    ``logit_scale`` turns logits back into
    cosines for MCM; ``mcm_temperature`` and ``k`` come from ``TEST.MCM_TEMPERATURE`` / ``TEST.KNN_K``, the
    OpenOOD settings from ``TEST.GEN_GAMMA``, ``TEST.GEN_M``, ``TEST.VIM_DIM``, ``TEST.RESIDUAL_DIM``.
    ``labels`` is set on the training split only (fits read it; scores never do); ``fitted`` holds each fitted
    score's statistics by score name (:func:`fit_score`); ``local`` each local score's per-image reduction of the
    local logits by score name (:func:`reduce_local`). A :class:`ScoreInputs` without tensors carries the settings
    a ``reduce_local`` function reads.
    """

    logits: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    bank: Optional[torch.Tensor] = None
    score: Optional[torch.Tensor] = None
    logit_scale: float = 100.0
    mcm_temperature: float = 1.0
    k: int = 50
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # InferenceOutput.extras, by name
    local: dict[str, torch.Tensor] = field(default_factory=dict)  # score name -> its reduce_local output, (N,)
    labels: Optional[torch.Tensor] = None  # (N,) class indices: the training split's, for fits only
    gen_gamma: float = 0.1
    gen_m: int = 100
    vim_dim: int = 256
    residual_dim: int = 512
    fitted: dict[str, Any] = field(default_factory=dict)  # score name -> fit_score(name, training split)


ScoreFn = Callable[[ScoreInputs], torch.Tensor]
FitFn = Callable[[ScoreInputs], Any]
LocalFn = Callable[[torch.Tensor, ScoreInputs], torch.Tensor]  # (local logits (B, R, C), settings) -> (B,)


@dataclass(frozen=True)
class _Entry:
    fn: ScoreFn
    needs: tuple[str, ...]
    fit: Optional[FitFn] = None
    fit_needs: tuple[str, ...] = ()
    reduce_local: Optional[LocalFn] = None


_REGISTRY: dict[str, _Entry] = {}


def register_score(name: str, needs: Iterable[str] = ("logits",), fit: Optional[FitFn] = None,
                   fit_needs: Iterable[str] = (), reduce_local: Optional[LocalFn] = None
                   ) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: register ``fn(inputs) -> (N,) tensor`` under ``name``; ``needs`` names the inputs it reads.

    ``fit(training split inputs) -> statistics`` (with ``fit_needs``, a non-empty subset of :data:`FIT_FIELDS`)
    makes it a fitted score: ``fn`` then reads its statistics as ``inputs.fitted[name]``. A score whose ``needs``
    has ``local_logits`` gives ``reduce_local(local_logits (B, R, C), settings) -> (B,)``, applied to each batch
    at collection; ``fn`` then reads the per-image result as ``inputs.local[name]``.
    """
    needs, fit_needs = tuple(needs), tuple(fit_needs)
    bad = [n for n in needs if n not in INPUT_FIELDS]
    if bad:
        raise ValueError(f"score {name!r}: unknown input(s) {bad}; choose from {list(INPUT_FIELDS)}")
    if (fit is None) != (not fit_needs) or any(n not in FIT_FIELDS for n in fit_needs):
        raise ValueError(f"score {name!r}: a fit needs fit_needs from {list(FIT_FIELDS)} (and fit_needs a fit)")
    if ("local_logits" in needs) != (reduce_local is not None):
        raise ValueError(f"score {name!r}: a score that needs local_logits gives reduce_local (and only such a score)")

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in _REGISTRY:
            raise KeyError(f"score {name!r} is already registered")
        _REGISTRY[name] = _Entry(fn, needs, fit, fit_needs, reduce_local)
        return fn

    return deco


def score_names() -> list[str]:
    """Registered score names, in registration order."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown OOD score {name!r}; choose from {score_names()}")
    return _REGISTRY[name]


def score_needs(name: str) -> tuple[str, ...]:
    """The inputs score ``name`` reads (``needs`` of its registration)."""
    return _entry(name).needs


def missing_inputs(name: str, inputs: ScoreInputs) -> list[str]:
    """The inputs score ``name`` needs that ``inputs`` lacks (empty when it can be computed); ``local_logits``
    is there when ``inputs.local`` holds the score's reduction."""
    return [n for n in _entry(name).needs
            if (name not in inputs.local if n == "local_logits" else getattr(inputs, n) is None)]


def reduce_local(names: Iterable[str], local_logits: torch.Tensor, settings: ScoreInputs) -> dict[str, torch.Tensor]:
    """``{score: reduce_local(local_logits, settings)}`` for those of ``names`` that read local logits, on one
    batch ``(B, R, C)`` (a reducer shared by several scores runs once); each value has B rows."""
    done: dict[LocalFn, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name in names:
        fn = _entry(name).reduce_local
        if fn is None:
            continue
        if fn not in done:
            value = fn(local_logits, settings)
            if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] != local_logits.shape[0]:
                raise ValueError(f"score {name!r}: reduce_local returned {getattr(value, 'shape', type(value))}, "
                                 f"expected ({local_logits.shape[0]},)")
            done[fn] = value
        out[name] = done[fn]
    return out


def fit_needs(name: str) -> tuple[str, ...]:
    """What score ``name``'s fit reads of the ID training split (empty: the score is not fitted)."""
    return _entry(name).fit_needs


def fit_score(name: str, train: ScoreInputs) -> Any:
    """The statistics of fitted score ``name`` from the ID training split's inputs (``logits``, ``features``,
    ``labels`` as :func:`fit_needs` says); pass them to evaluation splits as ``ScoreInputs.fitted[name]``."""
    entry = _entry(name)
    if entry.fit is None:
        raise ValueError(f"score {name!r} is not fitted")
    missing = [n for n in entry.fit_needs if getattr(train, n) is None]
    if missing:
        raise ValueError(f"score {name!r}: its fit needs the training split's {', '.join(missing)}")
    return entry.fit(train)


def compute_score(name: str, inputs: ScoreInputs) -> np.ndarray:
    """Score ``name`` on ``inputs`` as a float64 numpy array of shape ``(N,)`` (higher = more ID)."""
    missing = missing_inputs(name, inputs)
    if missing:
        raise ValueError(f"score {name!r} needs {', '.join(missing)}")
    if _REGISTRY[name].fit is not None and name not in inputs.fitted:
        raise ValueError(f"score {name!r} needs statistics of the ID training split: inputs.fitted[{name!r}] = "
                         f"fit_score({name!r}, training split inputs)")
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


def l_mcm_score(local_cosines: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Local MCM (GL-MCM's local part): softmax over classes of each region's ``cos / T``, then the maximum over
    regions and classes, ``(N,)``. ``local_cosines`` is ``(N, R, C)`` raw region-text cosines. Higher = more ID."""
    _check_temperature(temperature)
    if not isinstance(local_cosines, torch.Tensor) or local_cosines.dim() != 3 or 0 in local_cosines.shape:
        raise ValueError(f"local_cosines must be a non-empty (N, R, C) tensor, got "
                         f"{tuple(getattr(local_cosines, 'shape', ()))}")
    x = local_cosines.detach()
    x = x if x.dtype == torch.float64 else x.float()
    if torch.isnan(x).any():
        raise ValueError("local_cosines contains NaN")
    return torch.softmax(x / temperature, dim=2).amax(dim=(1, 2))


def gl_mcm_score(cosines: torch.Tensor, local_cosines: torch.Tensor, temperature: float = 1.0,
                 lambda_local: float = 1.0) -> torch.Tensor:
    """GL-MCM (Miyai et al. 2023): ``MCM(cos / T) + lambda_local * L-MCM(local cos / T)``, ``(N,)``, one
    temperature for both parts (their ``--T``, default 1; ``--lambda_local`` default 1). Higher = more ID."""
    glob = mcm_score(cosines, temperature)
    return glob + lambda_local * l_mcm_score(local_cosines, temperature).to(glob.dtype)


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


def max_local_softmax(local_logits: torch.Tensor, settings: ScoreInputs) -> torch.Tensor:
    """The ``reduce_local`` of ``l_mcm`` / ``gl_mcm``: L-MCM of one batch, :func:`l_mcm_score` of the region
    cosines ``local_logits / logit_scale`` at ``mcm_temperature``, ``(B,)`` (float32 for float32 logits)."""
    return l_mcm_score(local_logits / settings.logit_scale, settings.mcm_temperature)


@register_score("l_mcm", needs=("local_logits",), reduce_local=max_local_softmax)
def l_mcm(inp: ScoreInputs) -> torch.Tensor:
    """Local MCM on the region cosines ``local_logits / logit_scale`` at ``mcm_temperature``."""
    return inp.local["l_mcm"]


@register_score("gl_mcm", needs=("logits", "local_logits"), reduce_local=max_local_softmax)
def gl_mcm(inp: ScoreInputs) -> torch.Tensor:
    """GL-MCM: MCM of the global cosines plus L-MCM of the region cosines, both at ``mcm_temperature``
    (cosines = logits / ``logit_scale``, as the authors divide CLIP's logits by 100), local weight 1
    (:func:`gl_mcm_score` with the local part reduced per batch)."""
    glob = mcm_score(_as_2d_float(inp.logits, "logits") / inp.logit_scale, inp.mcm_temperature)
    return glob + inp.local["gl_mcm"].to(glob.dtype)
