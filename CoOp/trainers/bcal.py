"""``BCAL`` trainer: Bayes-CAL (Zhu et al., AAAI 2023) as used as a baseline by the official CRoFT code.

Two CoOp-style prompt learners share CLIP's frozen encoders:

* **category** prompts ``"X ... X {classname}."`` classify the images (``logits = s * cos(image, class)``);
* **context** prompts ``"X ... X {domainname}."`` classify the images' *domains* (the dataset's domain names, or
  ``TRAINER.BCAL.DOMAIN_NAMES``).

Each learner's context is Gaussian variational: mean ``mu`` ~ N(0, 0.02^2), ``sigma`` initialised to
``SIGMA_INIT`` (1e-5), and training samples ``ctx = mu + sigma^2 * eps``; evaluation uses ``mu``. The loss is
:func:`trainers.bcal_losses.bcal_loss`: CE + ALPHA1 * CE(domain) + ALPHA2 * IRM + ALPHA3 * gradient alignment +
KL_SCALE * KL (official: 0.01 / 0.5 / 0.01, 1e-8). The official "context image branch" returns its input
unchanged, so both learners see the same image features. Only the two learners train (checkpoint model name
``prompt_learner`` with sub-modules ``category`` and ``context``). Inference returns an ``InferenceOutput`` with the
logits and normalised image features of the category prompts (score: the energy logsumexp(logits)).

The official Setup-I scripts cannot run: ImageNet46 has no domain names. Here a dataset without domain names is a
one-line configuration error unless the named fix ``TRAINER.BCAL.DOMAIN_NAMES`` (e.g. ``"['imagenet']"``)
supplies them.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from dassl.config.validate import PREC, count, nonneg, positive
from dassl.engine import TRAINER_REGISTRY
from dassl.utils.errors import ConfigError

from .bcal_losses import BCALLoss, bcal_loss, gaussian_kl
from .prompt_trainer import PromptCLIPTrainer
from .prompting import PromptTokens, assemble_prompts, encode_prompt_embeddings


class VariationalPromptLearner(nn.Module):
    """Generic context with a Gaussian posterior: ``ctx_mu`` [M, w], ``ctx_sigma`` [M, w] (std = sigma^2)."""

    def __init__(self, clip_model: nn.Module, context_length: int, names: Sequence[str], n_ctx: int,
                 sigma_init: float) -> None:
        super().__init__()
        width = clip_model.token_embedding.weight.shape[1]
        mu = torch.empty(n_ctx, width)
        nn.init.normal_(mu, std=0.02)
        self.ctx_mu = nn.Parameter(mu)
        self.ctx_sigma = nn.Parameter(torch.full((n_ctx, width), float(sigma_init)))
        PromptTokens(clip_model, context_length, names, " ".join(["X"] * n_ctx), n_ctx).attach(self)

    def std(self) -> torch.Tensor:
        """``sigma^2`` in fp32 (1e-10 underflows in fp16)."""
        return self.ctx_sigma.float() * self.ctx_sigma.float()

    def context(self, sample: bool) -> torch.Tensor:
        """``mu + sigma^2 * eps`` when ``sample`` else ``mu``."""
        if not sample:
            return self.ctx_mu
        return self.ctx_mu + (self.std() * torch.randn_like(self.std())).to(self.ctx_mu.dtype)

    def kl(self) -> torch.Tensor:
        return gaussian_kl(self.ctx_mu.float(), self.std())

    def forward(self, sample: bool = False) -> torch.Tensor:
        return assemble_prompts(self.token_prefix, self.context(sample), self.token_suffix, self.name_lens, "end")


class BCALPrompts(nn.Module):
    """The two learners, registered as one model so they checkpoint and step together."""

    def __init__(self, category: VariationalPromptLearner, context: VariationalPromptLearner) -> None:
        super().__init__()
        self.category = category
        self.context = context

    def kl(self) -> torch.Tensor:
        return self.category.kl() + self.context.kl()


def domain_names_of(cfg: Any, dataset: Any) -> list[str]:
    """``TRAINER.BCAL.DOMAIN_NAMES`` if set, else the dataset's domain names; a clear error if neither."""
    names = [str(n) for n in cfg.TRAINER.BCAL.DOMAIN_NAMES]
    if not names:
        names = [str(n) for n in (getattr(dataset, "domain_list", None) or getattr(dataset, "domains", None) or [])]
    if not names:
        raise ConfigError(f"BCAL needs domain names, and dataset {cfg.DATASET.NAME} has none (the official Setup-I "
                          f"bug: ImageNet46 has no domain names); set TRAINER.BCAL.DOMAIN_NAMES, e.g. "
                          f"\"['imagenet']\"")
    return names


@TRAINER_REGISTRY.register()
class BCAL(PromptCLIPTrainer):
    """Bayes-CAL: variational category and context prompts with IRM and gradient-alignment penalties."""

    CFG_RANGES = {"TRAINER.BCAL.N_CTX": count(0, "ignored with CTX_INIT; >= 1 without it"), "TRAINER.BCAL.PREC": PREC,
                  "TRAINER.BCAL.ALPHA1": nonneg(), "TRAINER.BCAL.ALPHA2": nonneg(), "TRAINER.BCAL.ALPHA3": nonneg(),
                  "TRAINER.BCAL.KL_SCALE": nonneg(), "TRAINER.BCAL.SIGMA_INIT": positive()}

    cfg_node = "BCAL"

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        c = cfg.TRAINER.BCAL = CN()
        c.N_CTX = 16                # context tokens of both learners
        c.CTX_INIT = ""             # official keys; only the defaults are supported (variational random init)
        c.CSC = False
        c.CLASS_TOKEN_POSITION = "end"
        c.PREC = "fp16"             # fp32 | fp16 | amp | bf16 (CPU: always fp32)
        c.FP32_PARAMS = False  # named fix: fp32 learnable parameters under fp16/bf16 (official: CLIP dtype)
        c.ALPHA1 = 0.01             # weight of the domain (context) cross-entropy
        c.ALPHA2 = 0.5              # weight of the IRM penalty
        c.ALPHA3 = 0.01             # weight of the gradient-alignment term
        c.KL_SCALE = 1e-8           # weight of the KL term of the variational contexts
        c.SIGMA_INIT = 1e-5         # initial sigma (std = sigma^2)
        c.DOMAIN_NAMES = []         # named fix: domain names for datasets without them (official: none -> crash)

    unsupported_keys = {"CTX_INIT": "", "CSC": False, "CLASS_TOKEN_POSITION": "end"}

    def build_prompt_model(self, clip_model: nn.Module, classnames: list[str]) -> nn.Module:
        c = self.cfg.TRAINER.BCAL
        self.domain_names = domain_names_of(self.cfg, self.dm.dataset)
        n_ctx, sigma = int(c.N_CTX), float(c.SIGMA_INIT)
        print(f"BCAL: {n_ctx} variational context tokens; domains {self.domain_names}; alphas "
              f"{float(c.ALPHA1)}/{float(c.ALPHA2)}/{float(c.ALPHA3)}, KL scale {float(c.KL_SCALE)}")
        category = VariationalPromptLearner(clip_model, self.context_length, classnames, n_ctx, sigma)
        context = VariationalPromptLearner(clip_model, self.context_length, self.domain_names, n_ctx, sigma)
        self.prompts = BCALPrompts(category, context)
        return self.prompts

    def load_model_drop_keys(self) -> set[str]:
        return {f"{m}.{k}" for m in ("category", "context") for k in ("token_prefix", "token_suffix")}

    # ------------------------------------------------------------------ forward
    def text_features(self, learner: VariationalPromptLearner) -> torch.Tensor:
        """Normalised text features ``[K, D]``; the context is sampled while the learner is in training mode."""
        tf = encode_prompt_embeddings(self.text_encoder, learner(sample=learner.training), learner.tokenized_prompts)
        return tf / tf.norm(dim=-1, keepdim=True)

    def forward_logits(self, feats: torch.Tensor, raw: torch.Tensor,
                       domains: Optional[torch.Tensor] = None) -> torch.Tensor:
        tf = self.text_features(self.prompts.category)
        return self.logit_scale * feats.to(tf.dtype) @ tf.t()

    def compute_loss(self, feats: torch.Tensor, label: torch.Tensor, domains: torch.Tensor) -> BCALLoss:
        c = self.cfg.TRAINER.BCAL
        n_dom = len(self.domain_names)
        if domains.numel() and (int(domains.min()) < 0 or int(domains.max()) >= n_dom):
            raise ConfigError(f"BCAL: batch domain labels {sorted(set(domains.tolist()))} do not index the "
                              f"{n_dom} domain names {self.domain_names} (check TRAINER.BCAL.DOMAIN_NAMES)")
        with self.autocast():
            class_tf = self.text_features(self.prompts.category)
            domain_tf = self.text_features(self.prompts.context)
        return bcal_loss(feats.float(), class_tf.float(), domain_tf.float(), label, domains, float(self.logit_scale),
                         (float(c.ALPHA1), float(c.ALPHA2), float(c.ALPHA3)), self.prompts.kl(), float(c.KL_SCALE))

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        image, label = self.parse_batch_train(batch)
        domains = batch["domain"].to(self.device) if "domain" in batch else torch.zeros_like(label)
        with self.autocast():
            feats, _ = self.image_features(image, batch)
        parts = self.compute_loss(feats.float(), label, domains)
        self.optimisation_step(parts.total)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        acc = (parts.logits.argmax(1) == label).float().mean().item() * 100.0
        return {"loss": parts.total.item(), "loss_ce": parts.ce.item(), "loss_domain": parts.ce_domain.item(),
                "irm": parts.irm.item(), "align": parts.align.item(), "acc": acc}
