"""CRoFT maths on pre-computed CLIP features (adapters, OOD feature generator, EDR loss, one training step).

The CLIP encoders are frozen, so everything CRoFT learns acts on features:

* ``X`` (N x D): raw (unnormalised) CLIP image features of a batch,
* ``T`` (C x D): raw class text features (computed once by the trainer),
* ``y`` (N,): integer labels.

Row-vector convention, ``n(v) = v / (||v|| + eps)`` row-wise (``eps`` = ``CRoFTOptions.norm_eps`` = 1e-6):

* forward:  ``X_hat = n(rho X W_i^T + (1-rho) X)``, ``T_hat = n(rho_t T W_t^T + (1-rho_t) T)``,
  ``logits = s X_hat T_hat^T``, ``score = logsumexp(logits)`` (higher = more in-distribution);
* generator: ``Cg = n(X_hat W_g + X_hat)``, ``L_gen = CE(s Cg T_hat^T, y) + lambda1 mean_ij(M_ij <Cg_i, X_hat_j>)``;
* EDR (official behaviour): ``dis = mean_ij(M_ij <Cg_i, X_zs_j>)``, ``Cmix = rho Cg + (1-rho) Cg W_i``;
  branch A: ``L1 = CE(s Cmix T_hat^T, y) - lambda1 dis``, ``Z = [X_zs; Cg]``;
  branch B: ``L1 = CE(s Cg T_hat^T, y)``, ``Z = X_zs``;
  ``Z' = n(rho Z (W_i+Delta) + (1-rho) Z)``, ``T' = n(rho_t T_zs (W_t+Delta) + (1-rho_t) T_zs)``,
  ``P = exp(Z' T'^T)``, Delta = ``delta`` * ones (a fresh leaf shared by both matrices);
  ``sum_meansq`` (Setup-I): ``G = d(sum P)/dDelta``, ``L2 = mean(G^2)``;
  ``mean_sumsq`` (Setup-II): ``G = d(mean P)/dDelta``, ``L2 = sum(G^2)``;
  ``EDR = L1 + lambda2 L2`` (or ``lambda2 L2`` when ``wccf`` is False). G keeps its graph, so L2 is trained.

Named fixes (all False = the official code's behaviour, which the parity fixtures reproduce):

* ``fix_edr_consistent``: EDR uses the forward-pass convention: ``Cmix = rho Cg W_i^T + (1-rho) Cg``,
  ``Z' = n(rho Z (W_i+Delta)^T + (1-rho) Z)``, ``T'`` likewise with ``W_t^T``.
* ``fix_separate_updates``: generator steps backpropagate to and step only ``W_g``; the main update only
  ``W_i``, ``W_t`` (a min-max split by parameter sets).
* ``fix_fresh_activations``: after every generator update the forward pass is recomputed with the current
  weights, so later generator steps, Cg, EDR and the main CE use fresh X_hat, T_hat, logits.
* ``fix_edr_temperature``: the EDR gradient is taken of the free energy at the detection score's temperature
  T = 1/s, ``-E_i = T * logsumexp_c(<z'_i, t'_c> / T)`` (a monotone rescaling of the score
  ``logsumexp(s cos)``; reduced over rows like P), instead of ``sum_c exp(<z'_i, t'_c>)`` at temperature 1.
  (A literal ``exp(s cos)`` overflows: with s = 100 it reaches ~1e80 and NaN in float32.)

How a Dassl trainer uses this module
------------------------------------
::

    from trainers.croft_core import (Adapter, OODImgGen, CRoFTOptions, forward, croft_train_step)

    D = text_features.shape[1]
    adapter = Adapter(D).to(device)              # register_model("clip_adapter", adapter, optim_a, sched_a)
    generator = OODImgGen(D).to(device)          # register_model("generator", generator, optim_g, sched_g)
    opts = CRoFTOptions(ratio=c.ratio, ratio_text=c.ratio_text, lambda1=c.lambda1, lambda2=c.lambda2,
                        gen_step=c.gen_step, wccf=c.WCCF,
                        edr_branch="A" if (c.WCCF and c.gen_step > 0 and edr_use_generated) else "B",
                        edr_reduction="sum_meansq" if setup_one else "mean_sumsq",
                        fix_edr_consistent=..., fix_separate_updates=..., ...)
    s = clip_model.logit_scale.exp().item()     # 100 for the OpenAI checkpoints

    # forward_backward(batch):
    X = encode_images(batch)                     # frozen CLIP image features, no grad
    stats = croft_train_step(adapter, generator, X, text_features, y, optim_a, optim_g, opts, s)
    # stats: {"loss", "ce", "gen_loss": [...], "edr", "L1", "L1_ce", "L2", "acc"} (python floats)
    # the schedulers are stepped by the trainer at the end of each epoch, as usual.

    # inference (model_inference):
    out = forward(adapter, X, text_features, opts, s)   # out.logits, out.score (OOD score), ...

``croft_train_step`` zero-grads and steps the two optimisers itself; it never touches the schedulers. The
optimisers should be ``torch.optim.SGD`` (momentum 0.9, weight decay from the config); every backward
materialises a (possibly zero) gradient for every parameter of both optimisers, so weight decay and momentum
act on every update exactly as in the official code. The generator is not used at inference time.
Nothing here depends on a device or dtype: all tensors are created from the inputs'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Adapter",
    "OODImgGen",
    "CRoFTOptions",
    "CRoFTOutput",
    "EDR_REDUCTIONS",
    "normalize",
    "forward",
    "generator_loss",
    "edr_loss",
    "croft_train_step",
]

#: accepted values of ``CRoFTOptions.edr_reduction`` -> (how P is reduced before the gradient, how G^2 is reduced)
EDR_REDUCTIONS = {
    "sum_meansq": ("sum", "mean"),  # Setup-I (ImageNet46)
    "mean_sumsq": ("mean", "sum"),  # Setup-II (PACS / VLCS)
}

Scale = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------- modules
def _eye(dim: int, stack: Optional[int], dtype: Optional[torch.dtype], device: Any) -> nn.Parameter:
    eye = torch.eye(dim, dtype=dtype, device=device)
    return nn.Parameter(eye if stack is None else eye.expand(stack, dim, dim).clone())


class Adapter(nn.Module):
    """Image and text adapters: two free D x D matrices, identity-initialised (checkpoint keys fc_i, fc_t).

    ``stack=K`` holds K independent adapters as K x D x D weights (one vectorised λ-sweep, see ``croft_stack``).
    """

    def __init__(self, dim: int, dtype: Optional[torch.dtype] = None, device: Any = None,
                 stack: Optional[int] = None) -> None:
        super().__init__()
        self.fc_i = _eye(dim, stack, dtype, device)
        self.fc_t = _eye(dim, stack, dtype, device)

    def forward(self, X: torch.Tensor, T: torch.Tensor, ratio: float, ratio_text: float,
                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapted, normalised (X_hat, T_hat)."""
        return (_residual_mix(X, self.fc_i, ratio, eps, transpose=True),
                _residual_mix(T, self.fc_t, ratio_text, eps, transpose=True))


class OODImgGen(nn.Module):
    """Worst-case covariate-shift feature generator: one D x D matrix, identity-initialised (key img2img_cov);
    ``stack=K``: K generators as K x D x D."""

    def __init__(self, dim: int, dtype: Optional[torch.dtype] = None, device: Any = None,
                 stack: Optional[int] = None) -> None:
        super().__init__()
        self.img2img_cov = _eye(dim, stack, dtype, device)

    def forward(self, img_feat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Cg = n(img_feat W_g + img_feat) (no transpose on W_g)."""
        return normalize(img_feat @ self.img2img_cov + img_feat, eps)


# --------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class CRoFTOptions:
    ratio: float = 0.2
    ratio_text: float = 0.5
    lambda1: float = 1.0
    lambda2: float = 5.0
    gen_step: int = 1
    wccf: bool = True
    edr_branch: str = "A"
    edr_reduction: str = "mean_sumsq"
    norm_eps: float = 1e-6
    delta: float = 1e-4
    logit_scale: Optional[float] = None  # s; used when the functions below get s=None
    # named fixes (False = official behaviour)
    fix_edr_consistent: bool = False
    fix_separate_updates: bool = False
    fix_fresh_activations: bool = False
    fix_edr_temperature: bool = False

    def __post_init__(self) -> None:
        if self.edr_branch not in ("A", "B"):
            raise ValueError(f"edr_branch must be 'A' or 'B', got {self.edr_branch!r}")
        if self.edr_reduction not in EDR_REDUCTIONS:
            raise ValueError(f"edr_reduction must be one of {sorted(EDR_REDUCTIONS)}, got {self.edr_reduction!r}")
        if int(self.gen_step) < 0:
            raise ValueError("gen_step must be >= 0")

    @property
    def runs_generator(self) -> bool:
        """Whether a training step performs generator updates (WCCF and gen_step > 0)."""
        return bool(self.wccf) and int(self.gen_step) > 0

    @property
    def effective_branch(self) -> str:
        """'A' only when asked for and allowed by the official condition (WCCF and gen_step > 0)."""
        return "A" if (self.edr_branch == "A" and self.runs_generator) else "B"


class CRoFTOutput(NamedTuple):
    logits: torch.Tensor    # N x C, s * X_hat T_hat^T
    img_feat: torch.Tensor  # X_hat
    txt_feat: torch.Tensor  # T_hat
    img_zs: torch.Tensor    # n(X)
    txt_zs: torch.Tensor    # n(T)
    score: torch.Tensor     # logsumexp(logits) per row


# --------------------------------------------------------------------------------------------- helpers
def normalize(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Row-wise v / (||v||_2 + eps); eps is added to the norm (not squared)."""
    return v / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + eps)


def _residual_mix(Z: torch.Tensor, W: torch.Tensor, rho: float, eps: float, transpose: bool) -> torch.Tensor:
    """n(rho * Z W' + (1 - rho) * Z) with W' = W^T if transpose else W."""
    Wm = W.transpose(-1, -2) if transpose else W
    return normalize(rho * (Z @ Wm) + (1.0 - rho) * Z, eps)


def _scale(s: Optional[Scale], opts: CRoFTOptions, ref: torch.Tensor) -> Scale:
    if s is None:
        s = opts.logit_scale
        if s is None:
            raise ValueError("logit scale s not given (pass s or set CRoFTOptions.logit_scale)")
    if isinstance(s, torch.Tensor):
        return s.detach().to(device=ref.device, dtype=ref.dtype)
    return float(s)


def _scaled_logits(s: Scale, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    # (s * A) @ B^T: the scale goes into the left operand first, as the official code does.
    return (s * A) @ B.transpose(-1, -2)


def _same_label_mean(A: torch.Tensor, B: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over all N^2 pairs of 1[y_i = y_j] <A_i, B_j> (diagonal included, plain mean); one per stacked run."""
    mask = (y.view(-1, 1) == y.view(1, -1)).to(A.dtype)
    return (mask * (A @ B.transpose(-1, -2))).mean(dim=(-2, -1))


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; for stacked logits (K x N x C) one mean per run (K,)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, y)
    k, n, c = logits.shape
    return F.cross_entropy(logits.reshape(k * n, c), y.repeat(k), reduction="none").view(k, n).mean(dim=1)


def _per_run_mean(t: torch.Tensor, dims: int) -> torch.Tensor:
    """Mean over the last ``dims`` dimensions, summed over stacked runs (each run's gradient is its own)."""
    return t.mean(dim=tuple(range(-dims, 0))).sum()


def _lead(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (M x D) broadcast to the stacked leading dimension of ``like`` (K x N x D), if any."""
    return t if like.dim() == t.dim() else t.expand(*like.shape[:-2], *t.shape)


# --------------------------------------------------------------------------------------------- maths
def forward(adapter: Adapter, X: torch.Tensor, T: torch.Tensor, opts: CRoFTOptions,
            s: Optional[Scale] = None) -> CRoFTOutput:
    """CRoFT forward pass on raw features (training and inference)."""
    s = _scale(s, opts, X)
    eps = opts.norm_eps
    img_zs = normalize(X, eps)
    txt_zs = normalize(T, eps)
    img_feat, txt_feat = adapter(X, T, opts.ratio, opts.ratio_text, eps)
    logits = _scaled_logits(s, img_feat, txt_feat)
    score = torch.logsumexp(logits, dim=-1)
    return CRoFTOutput(logits, img_feat, txt_feat, img_zs, txt_zs, score)


def generator_loss(generator: OODImgGen, img_feat: torch.Tensor, txt_feat: torch.Tensor, y: torch.Tensor,
                   opts: CRoFTOptions, s: Optional[Scale] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_gen, Cg, CE part): L_gen = CE(s Cg T_hat^T, y) + lambda1 * mean_ij(M_ij <Cg_i, X_hat_j>)."""
    s = _scale(s, opts, img_feat)
    cg = generator(img_feat, opts.norm_eps)
    ce = _cross_entropy(_scaled_logits(s, cg, txt_feat), y)
    loss = ce + opts.lambda1 * _same_label_mean(cg, img_feat, y)
    return loss, cg, ce


def edr_loss(adapter: Adapter, Cg: torch.Tensor, img_feat: torch.Tensor, txt_feat: torch.Tensor,
             y: torch.Tensor, img_zs: torch.Tensor, txt_zs: torch.Tensor, opts: CRoFTOptions,
             s: Optional[Scale] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(EDR, parts) with parts = {L1, L1_ce, L2, G, dis}; EDR = L1 + lambda2 L2 (lambda2 L2 if not wccf).

    Uses the adapter's *current* W_i, W_t. G is computed with create_graph=True, so EDR is differentiable
    w.r.t. W_i, W_t and (through Cg) the generator and the forward graph.
    """
    s = _scale(s, opts, img_feat)
    eps = opts.norm_eps
    W_i, W_t = adapter.fc_i, adapter.fc_t
    rho, rho_t = opts.ratio, opts.ratio_text
    consistent = opts.fix_edr_consistent

    dis = _same_label_mean(Cg, img_zs, y)
    if opts.effective_branch == "A":
        if consistent:
            cmix = rho * (Cg @ W_i.transpose(-1, -2)) + (1.0 - rho) * Cg
        else:  # official: ratios swapped w.r.t. the forward pass, no transpose, no renormalisation
            cmix = rho * Cg + (1.0 - rho) * (Cg @ W_i)
        l1_ce = _cross_entropy(_scaled_logits(s, cmix, txt_feat), y)
        l1 = l1_ce - opts.lambda1 * dis
        Z = torch.cat([_lead(img_zs, Cg), Cg], dim=-2)
    else:
        l1_ce = _cross_entropy(_scaled_logits(s, Cg, txt_feat), y)
        l1 = l1_ce
        Z = img_zs

    # energy-gradient term: Delta is a fresh leaf on the inputs' device/dtype, shared by both matrices
    delta = torch.full(tuple(W_i.shape), opts.delta, dtype=W_i.dtype, device=W_i.device, requires_grad=True)
    z_p = _residual_mix(Z, W_i + delta, rho, eps, transpose=consistent)
    t_p = _residual_mix(txt_zs, W_t + delta, rho_t, eps, transpose=consistent)
    sim = z_p @ t_p.transpose(-1, -2)
    p_red, g_red = EDR_REDUCTIONS[opts.edr_reduction]
    if opts.fix_edr_temperature:
        # the energy at the detection score's temperature T = 1/s: -E_i = T * logsumexp_c(cos / T)
        # (same ranking as the score logsumexp(s * cos); the factor T keeps its gradient on the scale of cos)
        scale = _scale(s, opts, sim)
        neg_energy = torch.logsumexp(scale * sim, dim=-1) / scale
        target = neg_energy.sum() if p_red == "sum" else _per_run_mean(neg_energy, 1)
    else:
        P = torch.exp(sim)
        target = P.sum() if p_red == "sum" else _per_run_mean(P, 2)
    (G,) = torch.autograd.grad(target, delta, create_graph=True)  # stacked runs: G[k] = d target_k / d Delta_k
    G2 = G * G
    l2 = G2.mean(dim=(-2, -1)) if g_red == "mean" else G2.sum(dim=(-2, -1))

    edr = (l1 + opts.lambda2 * l2) if opts.wccf else (opts.lambda2 * l2)
    return edr, {"L1": l1, "L1_ce": l1_ce, "L2": l2, "G": G, "dis": dis}


# --------------------------------------------------------------------------------------------- training
def _optim_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _backward(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool) -> None:
    """Backward to exactly `params`, then give every one of them a gradient tensor (zeros if unreached)."""
    needs = [p for p in params if p.requires_grad]
    if loss.dim():  # stacked runs: the runs' parameters are disjoint, so d(sum)/dW_k = dL_k/dW_k
        loss = loss.sum()
    if needs:
        torch.autograd.backward(loss, inputs=needs, retain_graph=retain_graph)
    for p in needs:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _named_params(adapter: nn.Module, generator: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(adapter.named_parameters()) + list(generator.named_parameters())


def _snapshot(named: list[tuple[str, torch.Tensor]], loss: torch.Tensor, is_main: bool) -> dict[str, Any]:
    rec: dict[str, Any] = {"loss": loss.detach().clone(), "is_main": is_main}
    for name, p in named:
        rec["grad_" + name] = (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p.detach()))
    return rec


def _py(t: torch.Tensor) -> Any:
    """A python float, or for stacked runs a list of K floats."""
    t = t.detach()
    return t.tolist() if t.dim() else float(t)


def croft_train_step(adapter: Adapter, generator: OODImgGen, X: torch.Tensor, T: torch.Tensor,
                     y: torch.Tensor, opt_adapter: torch.optim.Optimizer, opt_generator: torch.optim.Optimizer,
                     opts: CRoFTOptions, s: Optional[Scale] = None, record: bool = False) -> dict[str, Any]:
    """One CRoFT training iteration in the official order.

    1. forward; 2. ``gen_step`` x (L_gen -> zero_grad both -> backward(retain_graph) -> step both), only if
    ``wccf``; 3. Cg with the current W_g on the (stale) X_hat; 4. EDR with the current W_i, W_t;
    5. total = CE(logits) + EDR -> zero_grad both -> backward -> step both.
    The fixes in ``opts`` alter steps 2-5 as described in the module docstring.

    Returns python floats ``loss`` (= total), ``ce``, ``gen_loss`` (list), ``edr``, ``L1``, ``L1_ce``, ``L2``,
    ``acc`` (top-1 %, of the logits of step 1). With ``record=True`` also ``record``: a dict of detached
    tensors (forward outputs, Cg, EDR parts, and ``updates``: per update its loss, raw gradients ``grad_<param>``
    before weight decay, and the weights ``<param>`` right after the step).
    """
    s = _scale(s, opts, X)
    opt_list = (opt_adapter, opt_generator)
    adapter_params = _optim_params(opt_adapter)
    gen_params = _optim_params(opt_generator)
    all_params = adapter_params + gen_params
    named = _named_params(adapter, generator) if record else []
    updates: list[dict[str, Any]] = []

    def _after_step(rec: Optional[dict[str, Any]]) -> None:
        if rec is not None:
            for name, p in named:
                rec[name] = p.detach().clone()
            updates.append(rec)

    # 1. forward pass with the start-of-iteration weights
    out0 = forward(adapter, X, T, opts, s)
    out = out0

    # 2. generator steps
    gen_losses: list[torch.Tensor] = []
    gen_ces: list[torch.Tensor] = []
    if opts.runs_generator:
        for _ in range(int(opts.gen_step)):
            l_gen, _cg, ce_g = generator_loss(generator, out.img_feat, out.txt_feat, y, opts, s)
            for o in opt_list:
                o.zero_grad(set_to_none=True)
            _backward(l_gen, gen_params if opts.fix_separate_updates else all_params, retain_graph=True)
            rec = _snapshot(named, l_gen, False) if record else None
            if opts.fix_separate_updates:
                opt_generator.step()
            else:
                for o in opt_list:
                    o.step()
            _after_step(rec)
            gen_losses.append(l_gen.detach())
            gen_ces.append(ce_g.detach())
            if opts.fix_fresh_activations:
                out = forward(adapter, X, T, opts, s)

    # 3. Cg with the current generator (official: a full generator-loss call whose loss is discarded)
    cg_loss, cg, cg_ce = generator_loss(generator, out.img_feat, out.txt_feat, y, opts, s)

    # 4. EDR with the current adapter weights
    edr, parts = edr_loss(adapter, cg, out.img_feat, out.txt_feat, y, out.img_zs, out.txt_zs, opts, s)

    # 5. main update
    ce = _cross_entropy(out.logits, y)
    total = ce + edr
    for o in opt_list:
        o.zero_grad(set_to_none=True)
    _backward(total, adapter_params if opts.fix_separate_updates else all_params, retain_graph=False)
    rec = _snapshot(named, total, True) if record else None
    if opts.fix_separate_updates:
        opt_adapter.step()
    else:
        for o in opt_list:
            o.step()
    _after_step(rec)

    with torch.no_grad():
        acc = (out0.logits.argmax(dim=-1) == y).to(out0.logits.dtype).mean(dim=-1) * 100.0

    stats: dict[str, Any] = {
        "loss": _py(total),
        "ce": _py(ce),
        "gen_loss": [_py(v) for v in gen_losses],
        "edr": _py(edr),
        "L1": _py(parts["L1"]),
        "L1_ce": _py(parts["L1_ce"]),
        "L2": _py(parts["L2"]),
        "acc": _py(acc),
    }
    if record:
        stats["record"] = {
            "logits": out0.logits.detach(),
            "score": out0.score.detach(),
            "img_feat": out0.img_feat.detach(),
            "txt_feat": out0.txt_feat.detach(),
            "acc": acc.detach(),
            "gen_loss": gen_losses,
            "gen_ce": gen_ces,
            "cg": cg.detach(),
            "cg_call_loss": cg_loss.detach(),
            "cg_call_ce": cg_ce.detach(),
            "ce": ce.detach(),
            "edr": edr.detach(),
            "L1": parts["L1"].detach(),
            "L1_ce": parts["L1_ce"].detach(),
            "L2": parts["L2"].detach(),
            "G": parts["G"].detach(),
            "dis": parts["dis"].detach(),
            "total": total.detach(),
            "updates": updates,
        }
    return stats
