"""``BCAL`` trainer: Bayes-CAL (Zhu et al., AAAI 2023) as used as a baseline by the official CRoFT code.

Two CoOp-style prompt learners share CLIP's frozen encoders, each with its own SGD optimiser and scheduler (as
officially; checkpoint model names ``prompt_learner`` and ``prompt_learner_context``):

* **category** prompts ``"X ... X {classname}."`` classify the images (``logits = s * m(image) m(class)^T``);
* **context** prompts ``"X ... X {domainname}."`` classify the images' *domains*, over every domain of the dataset
  including the held-out one (or ``TRAINER.BCAL.DOMAIN_NAMES``).

``m(v) = v / (||v|| + 1e-6)``. Each learner's context is Gaussian variational: mean ``ctx`` ~ N(0, 0.02^2), scale
``ctx_sigma`` initialised to ``SIGMA_INIT`` (1e-5); every forward, evaluation included, uses
``ctx + ctx_sigma^2 * eps`` with fresh ``eps`` ~ N(0, 1) (official). The loss is :func:`trainers.bcal_losses.bcal_loss`:
CE + ALPHA1 * CE(domain) + ALPHA2 * IRM + ALPHA3 * alignment + KL (official weights 0.01 / 0.5 / 0.01; the KL of
each learner is ``max(0, KL_SCALE * sum[...])`` with its initial context as prior mean). Official by default:

* IRM summed over the domains present in the batch (``IRM_REDUCTION sum``; named fix ``mean``);
* the alignment term from gradients taken without a graph, so it shifts the loss value but trains nothing
  (``ALIGN_GRAD False``; named fix ``True``: the term is differentiable);
* the KL prior is the learner's initial context and sigma, clamped at 0 (``KL_PRIOR init``; named fix
  ``standard``: KL to N(0, 1), unclamped). The prior mean is a copy of the context made when the model is built
  (the official code on a GPU; on a CPU its prior would alias the live context);
* evaluation samples the contexts (``EVAL_NOISE True``; named fix ``False``: the posterior means).

The official "context image branch" returns its input unchanged, so both learners see the same image features.
Inference returns ``InferenceOutput(logits, m(image features), energy, extras={"context_logits"})``.

The official Setup-I scripts cannot run: ImageNet46 has no domain names. Here a dataset without domain names is a
one-line configuration error unless the named fix ``TRAINER.BCAL.DOMAIN_NAMES`` (e.g. ``"['imagenet']"``)
supplies them.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from dassl.config.validate import PREC, Range, count, nonneg, positive
from dassl.engine import TRAINER_REGISTRY
from dassl.engine.inference import InferenceOutput
from dassl.optim import build_lr_scheduler, build_optimizer
from dassl.utils.errors import ConfigError

from .bcal_losses import IRM_REDUCTIONS, KL_PRIORS, BCALLoss, bcal_loss, gaussian_kl, normalize, variational_kl
from .prompt_trainer import PromptCLIPTrainer
from .prompting import PromptTokens, assemble_prompts, encode_prompt_embeddings, upcast

CONTEXT_MODEL = "prompt_learner_context"


class VariationalPromptLearner(nn.Module):
    """Generic context with a Gaussian posterior: ``ctx`` [M, w], ``ctx_sigma`` [M, w] (std = sigma^2).

    ``ctx_prior``/``sigma_prior`` (buffers, not saved) hold the initial values, the KL prior. ``noise_source``
    (default None: ``torch.randn_like``) is a callable ``like -> eps`` for every noise draw, e.g. to replay
    recorded draws.
    """

    def __init__(self, clip_model: nn.Module, context_length: int, names: Sequence[str], n_ctx: int,
                 sigma_init: float) -> None:
        super().__init__()
        width = clip_model.token_embedding.weight.shape[1]
        ctx = torch.empty(n_ctx, width)
        nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)
        self.ctx_sigma = nn.Parameter(torch.full((n_ctx, width), float(sigma_init)))
        self.register_buffer("ctx_prior", ctx.detach().clone(), persistent=False)
        self.register_buffer("sigma_prior", self.ctx_sigma.detach().clone(), persistent=False)
        self.noise_source: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        PromptTokens(clip_model, context_length, names, " ".join(["X"] * n_ctx), n_ctx).attach(self)

    @torch.no_grad()
    def anchor_prior(self) -> None:
        """Make the current ``ctx``/``ctx_sigma`` the KL prior (done at build time; again after loading initial
        values from elsewhere)."""
        self.ctx_prior.copy_(self.ctx)
        self.sigma_prior.copy_(self.ctx_sigma)

    def context(self, sample: bool) -> torch.Tensor:
        """``ctx + ctx_sigma^2 * eps`` when ``sample``, else ``ctx``."""
        if not sample:
            return self.ctx
        eps = torch.randn_like(self.ctx) if self.noise_source is None else self.noise_source(self.ctx)
        return self.ctx + self.ctx_sigma ** 2 * eps.to(self.ctx)

    def kl(self, prior: str, scale: float) -> torch.Tensor:
        """``init`` (official): :func:`variational_kl` to the initial values; ``standard``: ``scale`` * KL to
        N(0, 1) of N(ctx, sigma^4), unclamped."""
        mu, sigma = upcast(self.ctx), upcast(self.ctx_sigma)
        if prior == "standard":
            return scale * gaussian_kl(mu, sigma * sigma)
        return variational_kl(mu, sigma, upcast(self.ctx_prior), upcast(self.sigma_prior), scale)

    def forward(self, sample: bool) -> torch.Tensor:
        return assemble_prompts(self.token_prefix, self.context(sample), self.token_suffix, self.name_lens, "end")


class BCALPrompts(nn.Module):
    """The two learners in one module for casting and moving; each is registered (and stepped) on its own."""

    def __init__(self, category: VariationalPromptLearner, context: VariationalPromptLearner) -> None:
        super().__init__()
        self.category = category
        self.context = context


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
                  "TRAINER.BCAL.KL_SCALE": nonneg(), "TRAINER.BCAL.SIGMA_INIT": positive(),
                  "TRAINER.BCAL.IRM_REDUCTION": Range(choices=IRM_REDUCTIONS),
                  "TRAINER.BCAL.ALIGN_GRAD": Range(choices=("False", "True")),
                  "TRAINER.BCAL.KL_PRIOR": Range(choices=KL_PRIORS),
                  "TRAINER.BCAL.EVAL_NOISE": Range(choices=("True", "False"))}

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
        c.KL_SCALE = 1e-8           # scale inside each learner's KL term (official 1e-8)
        c.SIGMA_INIT = 1e-5         # initial sigma (std = sigma^2)
        c.DOMAIN_NAMES = []         # named fix: domain names for datasets without them (official: none -> crash)
        c.IRM_REDUCTION = "sum"     # sum (official: over the batch's domains) | mean (named fix)
        c.ALIGN_GRAD = False        # named fix True: the alignment term is differentiable (official: a constant)
        c.KL_PRIOR = "init"         # init (official: prior = initial context, clamped at 0) | standard (N(0, 1))
        c.EVAL_NOISE = True         # official: evaluation samples the contexts; named fix False: posterior means

    unsupported_keys = {"CTX_INIT": "", "CSC": False, "CLASS_TOKEN_POSITION": "end"}

    def build_prompt_model(self, clip_model: nn.Module, classnames: list[str]) -> nn.Module:
        c = self.cfg.TRAINER.BCAL
        self.domain_names = domain_names_of(self.cfg, self.dm.dataset)
        n_ctx, sigma = int(c.N_CTX), float(c.SIGMA_INIT)
        print(f"BCAL: {n_ctx} variational context tokens; domains {self.domain_names}; alphas "
              f"{float(c.ALPHA1)}/{float(c.ALPHA2)}/{float(c.ALPHA3)}, KL scale {float(c.KL_SCALE)}; IRM "
              f"{c.IRM_REDUCTION}, alignment gradient {c.ALIGN_GRAD}, KL prior {c.KL_PRIOR}, evaluation noise "
              f"{c.EVAL_NOISE}")
        category = VariationalPromptLearner(clip_model, self.context_length, classnames, n_ctx, sigma)
        context = VariationalPromptLearner(clip_model, self.context_length, self.domain_names, n_ctx, sigma)
        self.prompts = BCALPrompts(category, context)
        return self.prompts

    def register_prompt_model(self, module: nn.Module) -> None:
        """One optimiser and scheduler per learner, as officially (``prompt_learner``, ``prompt_learner_context``)."""
        for name, learner in ((self.model_name, module.category), (CONTEXT_MODEL, module.context)):
            learner.anchor_prior()          # prior = the context as built and cast (a copy)
            optim = build_optimizer(learner, self.cfg.OPTIM)
            self.register_model(name, learner, optim, build_lr_scheduler(optim, self.cfg.OPTIM))
        self.optim, self.sched = self._optims[self.model_name], self._scheds[self.model_name]

    # ------------------------------------------------------------------ forward
    def text_features(self, learner: VariationalPromptLearner, sample: bool) -> torch.Tensor:
        """``m(text features)`` ``[K, D]`` of a learner's prompts (context sampled when ``sample``)."""
        tf = encode_prompt_embeddings(self.text_encoder, learner(sample), learner.tokenized_prompts)
        return normalize(upcast(tf))

    def raw_image_features(self, images: torch.Tensor, batch: Optional[dict] = None) -> torch.Tensor:
        return upcast(self.encode_images(images, batch))

    def kl(self) -> torch.Tensor:
        c = self.cfg.TRAINER.BCAL
        return sum(learner.kl(c.KL_PRIOR, float(c.KL_SCALE)) for learner in (self.prompts.category,
                                                                              self.prompts.context))

    def compute_loss(self, raw: torch.Tensor, label: torch.Tensor, domains: torch.Tensor) -> BCALLoss:
        c = self.cfg.TRAINER.BCAL
        n_dom = len(self.domain_names)
        if domains.numel() and (int(domains.min()) < 0 or int(domains.max()) >= n_dom):
            raise ConfigError(f"BCAL: batch domain labels {sorted(set(domains.tolist()))} do not index the "
                              f"{n_dom} domain names {self.domain_names} (check TRAINER.BCAL.DOMAIN_NAMES)")
        with self.autocast():
            class_tf = self.text_features(self.prompts.category, sample=True)
            domain_tf = self.text_features(self.prompts.context, sample=True)
        return bcal_loss(raw, upcast(class_tf), upcast(domain_tf), label, domains, float(self.logit_scale),
                         (float(c.ALPHA1), float(c.ALPHA2), float(c.ALPHA3)), self.kl(), str(c.IRM_REDUCTION),
                         bool(c.ALIGN_GRAD))

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        image, label = self.parse_batch_train(batch)
        domains = batch["domain"].to(self.device) if "domain" in batch else torch.zeros_like(label)
        with self.autocast():
            raw = self.raw_image_features(image, batch)
        parts = self.compute_loss(raw, label, domains)
        self.optimisation_step(parts.total)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        acc = (parts.logits.argmax(1) == label).sum().item() * (100.0 / label.numel())   # official formula
        return {"loss": parts.total.item(), "loss_ce": parts.ce.item(), "loss_domain": parts.ce_domain.item(),
                "irm": parts.irm.item(), "align": parts.align.item(), "kl": parts.kl.item(), "acc": acc}

    def model_inference(self, input: Any) -> InferenceOutput:
        """Category logits, ``m(image features)``, their energy and the context logits (``extras``)."""
        images = input[0] if isinstance(input, (tuple, list)) else input
        sample = bool(self.cfg.TRAINER.BCAL.EVAL_NOISE)
        with self.autocast():
            img = normalize(self.raw_image_features(images))
            class_tf = self.text_features(self.prompts.category, sample)
            domain_tf = self.text_features(self.prompts.context, sample)
        logits = self.logit_scale * img @ upcast(class_tf).t()
        context_logits = self.logit_scale * img @ upcast(domain_tf).t()
        return InferenceOutput(logits=logits, features=img, score=torch.logsumexp(logits, dim=1),
                               extras={"context_logits": context_logits})
