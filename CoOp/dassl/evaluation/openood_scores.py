"""OpenOOD v1.5's post-hoc scores on a CLIP classifier's logits and features (registered in
:mod:`dassl.evaluation.scores`; ``TEST.OOD_SCORES`` selects them).

Every score is higher = more ID, the sign OpenOOD's postprocessors return as ``conf`` too. ``logits`` are the
method's own (CLIP scale ``s * cos``), ``features`` the image features its ``model_inference`` returns (the
L2-normalised CLIP image features its classifier reads; not re-normalised here, as OpenOOD uses the raw input of
its fc layer). Fitted statistics come from the ID training split (float64):

* ``maxlogit``: ``max_c logit_c`` (``maxlogit_postprocessor.py``).
* ``gen``: ``-sum_{top-M p} p^g (1 - p)^g`` of ``p = softmax(logits)``, ``g = TEST.GEN_GAMMA`` (0.1),
  ``M = TEST.GEN_M`` (100) (``gen_postprocessor.py``, ``gen.yml``).
* ``temp_msp``: ``max softmax(logits / T)``, ``T`` fitted as OpenOOD: starts at 1.5, ``torch.optim.LBFGS(lr=0.01,
  max_iter=50)``, one ``step`` on the mean cross-entropy (float32) (``temp_scaling_postprocessor.py``; OpenOOD
  fits on its ID val split, here on the training split).
* ``mahalanobis``: ``max_c -(x - mu_c)^T P (x - mu_c)``, class means ``mu_c`` and ``P`` = pinvh of the tied
  covariance (``EmpiricalCovariance(assume_centered=False)`` of the class-centred features)
  (``mds_postprocessor.py``). Classes without training images are left out (OpenOOD would give NaN).
* ``vim``: ``logsumexp(logits) - alpha * ||(x - u) NS||``; ``NS`` spans the eigenvectors of the uncentred
  covariance of ``x - u`` beyond the ``TEST.VIM_DIM`` (256) largest eigenvalues; ``alpha`` = mean max logit /
  mean ``||(x - u) NS||`` on the training split (``vim_postprocessor.py``).
* ``residual``: ``-||(x - u) NS||`` with ``TEST.RESIDUAL_DIM`` (512) principal dimensions
  (``residual_postprocessor.py``; OpenOOD fits on its ID val split, here on the training split).

The origin ``u = -pinv(W) b``: OpenOOD's fc is ``logits = x W^T + b``; CLIP's classifier is ``W = s T`` (text
features times the logit scale) with no bias, so ``u = 0`` for every method here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .scores import ScoreInputs, _as_2d_float, energy_score, msp_score, register_score

__all__ = [
    "maxlogit_score",
    "gen_score",
    "fit_temperature",
    "ClassGaussians",
    "fit_class_gaussians",
    "mahalanobis_score",
    "Subspace",
    "fit_subspace",
    "residual_norm",
    "fit_vim",
    "vim_score",
    "Temperature",
]

TEMP_INIT, TEMP_LR, TEMP_MAX_ITER = 1.5, 0.01, 50  # OpenOOD's temperature-scaling fit


def _f64(x: torch.Tensor, name: str) -> torch.Tensor:
    return _as_2d_float(x, name).double()


def maxlogit_score(logits: torch.Tensor) -> torch.Tensor:
    """MaxLogit (Hendrycks et al. 2022): the largest logit, ``(N,)``."""
    return _as_2d_float(logits, "logits").max(dim=1).values


def gen_score(logits: torch.Tensor, gamma: float = 0.1, m: int = 100) -> torch.Tensor:
    """GEN (Liu et al. 2023): minus the generalised entropy of the ``m`` largest softmax probabilities."""
    if not gamma > 0 or m < 1:
        raise ValueError(f"GEN needs gamma > 0 and M >= 1, got gamma={gamma}, M={m}")
    p = torch.softmax(_f64(logits, "logits"), dim=1)
    top = torch.topk(p, min(int(m), p.shape[1]), dim=1).values
    return -(top ** gamma * (1.0 - top) ** gamma).sum(dim=1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """OpenOOD's temperature scaling: T from 1.5 by one LBFGS step (lr 0.01, 50 iterations) on the mean
    cross-entropy of ``logits / T`` (float32). Padded ``-inf`` classes are left out of the softmax."""
    x = _as_2d_float(logits, "logits").float()
    y = torch.as_tensor(labels).long().to(x.device)
    finite = torch.isfinite(x)
    safe = torch.where(finite, x, torch.zeros_like(x))  # no inf in the graph: its gradient would be NaN
    t = torch.nn.Parameter(torch.full((1,), TEMP_INIT, device=x.device))
    opt = torch.optim.LBFGS([t], lr=TEMP_LR, max_iter=TEMP_MAX_ITER)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        scaled = torch.where(finite, safe / t, torch.full_like(safe, float("-inf")))
        loss = torch.nn.functional.cross_entropy(scaled, y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    value = float(t.detach().item())
    if not value > 0 or value == float("inf"):
        raise ValueError(f"temp_msp: the fitted temperature is {value}, not a positive number")
    return value


@dataclass(frozen=True)
class ClassGaussians:
    """Mahalanobis statistics: class means ``(C, D)`` of the classes seen in training and the tied precision."""

    means: torch.Tensor
    precision: torch.Tensor

    def summary(self) -> dict[str, Any]:
        return {"classes": int(self.means.shape[0])}


def fit_class_gaussians(features: torch.Tensor, labels: torch.Tensor) -> ClassGaussians:
    """Class means and the pseudo-inverse of the shared covariance of the class-centred features (as
    ``sklearn.covariance.EmpiricalCovariance(assume_centered=False)``: the pooled centred data's mean is
    subtracted once more, divisor N)."""
    x = _f64(features, "features")
    y = torch.as_tensor(labels).long().to(x.device)
    classes = torch.unique(y)
    means = torch.stack([x[y == c].mean(dim=0) for c in classes])
    centred = x - means[torch.searchsorted(classes, y)]
    centred = centred - centred.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / x.shape[0]
    return ClassGaussians(means, torch.linalg.pinv(cov, hermitian=True))


def mahalanobis_score(features: torch.Tensor, stats: ClassGaussians) -> torch.Tensor:
    """``max_c -(x - mu_c)^T P (x - mu_c)``, expanded as ``x'Px - 2 x'P mu_c + mu_c'P mu_c`` (one matmul)."""
    x = _f64(features, "features").to(stats.precision.device)
    xp = x @ stats.precision
    mp = stats.means @ stats.precision
    d2 = (xp * x).sum(dim=1, keepdim=True) - 2.0 * xp @ stats.means.T + (mp * stats.means).sum(dim=1)
    return -d2.min(dim=1).values


@dataclass(frozen=True)
class Subspace:
    """ViM / Residual statistics: origin ``u`` ``(D,)``, basis ``NS`` ``(D, D - dim)`` of the residual space."""

    origin: torch.Tensor
    null_space: torch.Tensor
    dim: int
    alpha: Optional[float] = None  # ViM's scale of the residual norm

    def summary(self) -> dict[str, Any]:
        return {"dim": self.dim} if self.alpha is None else {"dim": self.dim, "alpha": self.alpha}


def fit_subspace(features: torch.Tensor, dim: int) -> Subspace:
    """Eigenvectors of ``cov = (x - u)^T (x - u) / N`` (``u = 0``: CLIP heads have no bias) beyond the ``dim``
    largest eigenvalues."""
    x = _f64(features, "features")
    if not 1 <= dim < x.shape[1]:
        raise ValueError(f"the principal dimension {dim} must be in [1, {x.shape[1] - 1}] for {x.shape[1]}-D features")
    origin = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    centred = x - origin
    vals, vecs = torch.linalg.eigh(centred.T @ centred / x.shape[0])
    order = torch.argsort(vals, descending=True)
    return Subspace(origin, vecs[:, order[dim:]].contiguous(), int(dim))


def residual_norm(features: torch.Tensor, sub: Subspace) -> torch.Tensor:
    """``||(x - u) NS||`` per row."""
    x = _f64(features, "features").to(sub.origin.device)
    return ((x - sub.origin) @ sub.null_space).norm(dim=1)


def fit_vim(features: torch.Tensor, logits: torch.Tensor, dim: int) -> Subspace:
    """The residual space of :func:`fit_subspace` with ``alpha = mean max logit / mean residual norm``."""
    sub = fit_subspace(features, dim)
    alpha = maxlogit_score(logits).double().mean() / residual_norm(features, sub).mean()
    return Subspace(sub.origin, sub.null_space, sub.dim, float(alpha))


def vim_score(features: torch.Tensor, logits: torch.Tensor, sub: Subspace) -> torch.Tensor:
    """ViM (Wang et al. 2022): ``logsumexp(logits) - alpha * ||(x - u) NS||``."""
    return energy_score(_f64(logits, "logits")) - sub.alpha * residual_norm(features, sub)


@dataclass(frozen=True)
class Temperature:
    """The temperature of ``temp_msp``."""

    temperature: float

    def summary(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


# ------------------------------------------------------------------------------------------------ registered scores


@register_score("maxlogit", needs=("logits",))
def maxlogit(inp: ScoreInputs) -> torch.Tensor:
    """The largest logit."""
    return maxlogit_score(inp.logits)


@register_score("gen", needs=("logits",))
def gen(inp: ScoreInputs) -> torch.Tensor:
    """GEN at ``gen_gamma`` / ``gen_m``."""
    return gen_score(inp.logits, inp.gen_gamma, inp.gen_m)


@register_score("temp_msp", needs=("logits",), fit=lambda t: Temperature(fit_temperature(t.logits, t.labels)),
                fit_needs=("logits", "labels"))
def temp_msp(inp: ScoreInputs) -> torch.Tensor:
    """MSP of ``logits / T``, ``T`` fitted on the training split."""
    return msp_score(_f64(inp.logits, "logits") / inp.fitted["temp_msp"].temperature)


@register_score("mahalanobis", needs=("features",), fit=lambda t: fit_class_gaussians(t.features, t.labels),
                fit_needs=("features", "labels"))
def mahalanobis(inp: ScoreInputs) -> torch.Tensor:
    """Minus the smallest squared Mahalanobis distance to a training class mean (tied covariance)."""
    return mahalanobis_score(inp.features, inp.fitted["mahalanobis"])


@register_score("vim", needs=("logits", "features"), fit=lambda t: fit_vim(t.features, t.logits, t.vim_dim),
                fit_needs=("logits", "features"))
def vim(inp: ScoreInputs) -> torch.Tensor:
    """Energy minus the scaled residual norm (virtual logit)."""
    return vim_score(inp.features, inp.logits, inp.fitted["vim"])


@register_score("residual", needs=("features",), fit=lambda t: fit_subspace(t.features, t.residual_dim),
                fit_needs=("features",))
def residual(inp: ScoreInputs) -> torch.Tensor:
    """Minus the norm of the feature's residual beyond the principal subspace."""
    return -residual_norm(inp.features, inp.fitted["residual"])
