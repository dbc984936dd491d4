"""Loss pieces of Bayes-CAL (Zhu et al., AAAI 2023) as pure functions of tensors.

The total loss of one batch (:func:`bcal_loss`) is::

    CE(category logits, labels) + ALPHA1 * CE(context logits, domain labels)
        + ALPHA2 * IRM penalty + ALPHA3 * gradient alignment + KL_SCALE * KL

* :func:`gaussian_kl`: KL divergence of the Gaussian variational contexts from the N(0, 1) prior.
* :func:`irm_penalty`: IRMv1, the squared gradient of each domain's cross-entropy w.r.t. a dummy logit scale
  at 1, averaged over the domains present in the batch.
* :func:`gradient_alignment`: mean over samples of the squared cosine between the per-sample gradients of the
  two cross-entropies w.r.t. the (normalised) image feature (:func:`ce_feature_gradients`).

Every piece is differentiable w.r.t. the logits / class features, so the prompts receive gradients from the
penalty terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gaussian_kl(mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, std^2) || N(0, 1))`` summed over all elements: ``0.5 * sum(std^2 + mu^2 - 1 - log std^2)``."""
    var = std * std
    return 0.5 * (var + mu * mu - 1.0 - torch.log(var)).sum()


def irm_penalty(logits: torch.Tensor, labels: torch.Tensor, envs: torch.Tensor) -> torch.Tensor:
    """Mean over the environments in ``envs`` of ``(d/ds CE(s * logits_e, labels_e) at s = 1)^2``."""
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    penalties = []
    for env in torch.unique(envs):
        idx = envs == env
        loss = F.cross_entropy(logits[idx] * scale, labels[idx])
        (grad,) = torch.autograd.grad(loss, scale, create_graph=True)
        penalties.append(grad * grad)
    return torch.stack(penalties).mean()


def ce_feature_gradients(feats: torch.Tensor, class_feats: torch.Tensor, labels: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Per-sample gradient of ``CE(scale * feats_n @ class_feats^T, labels_n)`` w.r.t. ``feats_n``:
    ``scale * (softmax(logits_n) - onehot(labels_n)) @ class_feats`` -> ``[N, D]`` (differentiable)."""
    logits = scale * feats @ class_feats.t()
    residual = logits.softmax(dim=-1) - F.one_hot(labels, class_feats.shape[0]).to(logits.dtype)
    return scale * residual @ class_feats


def gradient_alignment(grad_a: torch.Tensor, grad_b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over rows of the squared cosine similarity between ``grad_a[n]`` and ``grad_b[n]``."""
    return (F.cosine_similarity(grad_a, grad_b, dim=-1, eps=eps) ** 2).mean()


@dataclass
class BCALLoss:
    """The total loss, its (unweighted) parts and the category logits."""

    total: torch.Tensor
    ce: torch.Tensor
    ce_domain: torch.Tensor
    irm: torch.Tensor
    align: torch.Tensor
    kl: torch.Tensor
    logits: torch.Tensor


def bcal_loss(feats: torch.Tensor, class_feats: torch.Tensor, domain_feats: torch.Tensor, labels: torch.Tensor,
              domains: torch.Tensor, scale: float, alphas: tuple[float, float, float], kl: torch.Tensor,
              kl_scale: float) -> BCALLoss:
    """Bayes-CAL loss from normalised image features ``[N, D]``, normalised class text features ``[C, D]``,
    normalised domain (context) text features ``[E, D]``, class and domain labels ``[N]``, the logit scale, the
    weights ``(alpha1, alpha2, alpha3)`` and the KL term of the variational contexts."""
    logits = scale * feats @ class_feats.t()
    domain_logits = scale * feats @ domain_feats.t()
    ce = F.cross_entropy(logits, labels)
    ce_domain = F.cross_entropy(domain_logits, domains)
    irm = irm_penalty(logits, labels, domains)
    align = gradient_alignment(ce_feature_gradients(feats, class_feats, labels, scale),
                               ce_feature_gradients(feats, domain_feats, domains, scale))
    a1, a2, a3 = alphas
    total = ce + a1 * ce_domain + a2 * irm + a3 * align + kl_scale * kl
    return BCALLoss(total, ce, ce_domain, irm, align, kl, logits)
