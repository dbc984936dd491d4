"""Loss pieces of Bayes-CAL (Zhu et al., AAAI 2023) as the official CRoFT code computes them, as pure functions.

The total loss of one batch (:func:`bcal_loss`) is::

    CE(category logits, labels) + ALPHA1 * CE(context logits, domain labels)
        + ALPHA2 * IRM + ALPHA3 * alignment + KL(category learner) + KL(context learner)

* :func:`normalize`: ``v / (||v|| + 1e-6)`` row-wise (the official normalisation of image, text and gradients).
* :func:`variational_kl`: the official KL term of one variational context, with the learner's initial context as
  prior mean, clamped at 0; :func:`gaussian_kl`: KL to N(0, 1), unclamped (``KL_PRIOR standard``).
* :func:`irm_penalty`: IRMv1 per domain present (sorted, :func:`irm_grads`), summed (official) or averaged
  (``IRM_REDUCTION mean``).
* :func:`gradient_alignment`: ``sum_i (m(g1_i) . m(g2_i))^2`` of the two cross-entropies' gradients w.r.t. the raw
  image features; taken without a graph (official: a constant) or with one (``ALIGN_GRAD True``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NORM_EPS = 1e-6            # official: x / (x.norm() + 1e-6)
IRM_REDUCTIONS = ("sum", "mean")
KL_PRIORS = ("init", "standard")


def normalize(v: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``v / (||v|| + eps)`` along the last dimension."""
    return v / (v.norm(dim=-1, keepdim=True) + eps)


def variational_kl(mu: torch.Tensor, sigma: torch.Tensor, mu0: torch.Tensor, sigma0: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Official KL term: ``max(0, scale * sum[log(s0/s + 1e-3) + (s^2 + (mu0 - mu)^2) / (2 s0^2 + 1e-3)])`` with
    ``s = sigma^2``, ``s0 = sigma0^2`` (``sigma`` the learnable scale, ``mu0``/``sigma0`` the initial values)."""
    s0, s = sigma0 ** 2, sigma ** 2
    kl = torch.log(s0 / s + 1e-3) + (s ** 2 + (mu0 - mu) ** 2) / (2 * s0 ** 2 + 1e-3)
    return torch.clamp(torch.sum(kl) * scale, min=0.0)


def gaussian_kl(mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, std^2) || N(0, 1))`` summed over all elements: ``0.5 * sum(std^2 + mu^2 - 1 - log std^2)``."""
    var = std * std
    return 0.5 * (var + mu * mu - 1.0 - torch.log(var)).sum()


def irm_grads(logits: torch.Tensor, labels: torch.Tensor, envs: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The environments present (ascending) and, per environment e, ``d/ds CE(s * logits_e, labels_e)`` at
    ``s = 1`` (CE averaged within e), with a graph."""
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    present = torch.unique(envs).tolist()
    grads = []
    for env in present:
        idx = envs == env
        loss = F.cross_entropy(logits[idx] * scale, labels[idx])
        grads.append(torch.autograd.grad(loss, scale, create_graph=True)[0])
    return present, torch.stack(grads)


def irm_penalty(logits: torch.Tensor, labels: torch.Tensor, envs: torch.Tensor,
                reduction: str = "sum") -> torch.Tensor:
    """IRMv1: the squares of :func:`irm_grads`, summed over the environments (``reduction="sum"``, official) or
    averaged (``"mean"``); differentiable (second order)."""
    if reduction not in IRM_REDUCTIONS:
        raise ValueError(f"IRM reduction must be one of {IRM_REDUCTIONS}, got {reduction!r}")
    _, grads = irm_grads(logits, labels, envs)
    total = (grads ** 2).sum()
    return total / len(grads) if reduction == "mean" else total


def gradient_alignment(loss_a: torch.Tensor, loss_b: torch.Tensor, feats: torch.Tensor,
                       create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_i (m(g_a,i) . m(g_b,i))^2, g_a, g_b)`` with ``g_x = d loss_x / d feats`` ([N, D]).

    ``create_graph=False`` (official) gives a constant: it shifts the loss value but trains nothing."""
    (g_a,) = torch.autograd.grad(loss_a, feats, retain_graph=True, create_graph=create_graph)
    (g_b,) = torch.autograd.grad(loss_b, feats, retain_graph=True, create_graph=create_graph)
    cos = (normalize(g_a) * normalize(g_b)).sum(dim=-1)
    return (cos ** 2).sum(), g_a, g_b


@dataclass
class BCALLoss:
    """The total loss, its (unweighted) parts, the logits of both prompt sets and the alignment gradients."""

    total: torch.Tensor
    ce: torch.Tensor
    ce_domain: torch.Tensor
    irm: torch.Tensor
    align: torch.Tensor
    kl: torch.Tensor
    logits: torch.Tensor
    domain_logits: torch.Tensor
    grad_ce: torch.Tensor
    grad_domain: torch.Tensor


def bcal_loss(raw_feats: torch.Tensor, class_feats: torch.Tensor, domain_feats: torch.Tensor,
              labels: torch.Tensor, domains: torch.Tensor, scale: float, alphas: tuple[float, float, float],
              kl: torch.Tensor, irm_reduction: str = "sum", align_grad: bool = False) -> BCALLoss:
    """Bayes-CAL loss from raw image features ``[N, D]`` (detached here and made a leaf, as officially),
    normalised class and domain (context) text features ``[C, D]``/``[E, D]``, class and domain labels ``[N]``,
    the logit scale, ``(alpha1, alpha2, alpha3)`` and the (already scaled) KL of the variational contexts."""
    feats = raw_feats.detach().requires_grad_(True)
    img = normalize(feats)
    logits = scale * img @ class_feats.t()
    domain_logits = scale * img @ domain_feats.t()
    ce = F.cross_entropy(logits, labels)
    ce_domain = F.cross_entropy(domain_logits, domains)
    align, g_ce, g_dom = gradient_alignment(ce, ce_domain, feats, create_graph=align_grad)
    irm = irm_penalty(logits, labels, domains, irm_reduction)
    a1, a2, a3 = alphas
    total = ce + a1 * ce_domain + a2 * irm + a3 * align + kl
    return BCALLoss(total, ce, ce_domain, irm, align, kl, logits, domain_logits, g_ce, g_dom)
