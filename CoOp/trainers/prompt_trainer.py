"""``PromptCLIPTrainer``: the trainer base shared by CoOp, CoCoOp and DPLCLIP.

Frozen CLIP in the requested precision (``TRAINER.<node>.PREC``), a text encoder over prompt embeddings, one
optimisation step with optional AMP, and inference returning ``InferenceOutput(logits, normalised image features)``.

Precision (``PREC``, official default ``fp16``): ``fp32``; ``fp16``/``bf16`` = frozen CLIP weights AND the learnable
parameters in that dtype, as the official code (its context vectors take CLIP's dtype); the named fix
``TRAINER.<node>.FP32_PARAMS True`` keeps the learnable parameters in fp32 (prompts are cast to the text encoder's
dtype); ``amp`` = fp32 weights under ``torch.autocast`` with a ``GradScaler`` on CUDA. Under ``fp16``/``bf16`` the
image and text features are upcast to fp32 (:func:`trainers.prompting.upcast`) before the logits, so logits, loss
and scores are computed in fp32 (official: fp16 logits); under ``amp`` they are computed under autocast and returned
as fp32. On CPU every mode runs in fp32 (:meth:`SimpleTrainer.resolve_precision`); the run
record's ``precision`` block says what was requested and used. A model cast to float64 computes in float64.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from clip_backbone import TextEncoder
from dassl.engine import TrainerX
from dassl.optim import build_lr_scheduler, build_optimizer
from dassl.utils.errors import ConfigError
from dassl.utils.torchtools import load_pretrained_weights
from dassl.engine.inference import InferenceOutput

from .clip_common import attach_local_encoder, freeze, load_clip_to_cpu
from .prompting import CLASS_TOKEN_POSITIONS, PROMPT_PRECISIONS, PromptLearner, encode_prompt_embeddings, upcast

class PromptCLIPTrainer(TrainerX):
    """What CoOp, CoCoOp and DPLCLIP share: frozen CLIP in the requested precision, a text encoder over prompt
    embeddings, and one optimisation step with optional AMP. Subclasses set ``cfg_node`` and implement
    ``build_prompt_model`` and ``forward_logits``."""

    cfg_node = ""         # name of the TRAINER.<node> config node
    model_name = "prompt_learner"
    READS_INIT_WEIGHTS = True  # MODEL.INIT_WEIGHTS initialises the learnable module, as upstream CoOp
    # keys the official extend_cfg declares for this trainer (so the official scripts' overrides merge) but the
    # trainer does not implement: only the default value is accepted (the official code ignores them silently)
    unsupported_keys: dict[str, Any] = {}

    def node(self, cfg: Any = None) -> Any:
        return (cfg or self.cfg).TRAINER[self.cfg_node]

    def load_model_drop_keys(self) -> set[str]:
        """CoOp's convention: the fixed token buffers are saved but rebuilt from the class names, never loaded."""
        return {"token_prefix", "token_suffix"}

    def check_cfg(self, cfg: Any) -> None:
        c = self.node(cfg)
        if c.PREC not in PROMPT_PRECISIONS:
            raise ConfigError(f"TRAINER.{self.cfg_node}.PREC must be one of {PROMPT_PRECISIONS}, got {c.PREC!r}")
        if not c.CTX_INIT and int(c.N_CTX) < 1:
            raise ConfigError(f"TRAINER.{self.cfg_node}.N_CTX must be >= 1, got {c.N_CTX}")
        for key, default in self.unsupported_keys.items():
            if c[key] != default:
                raise ConfigError(f"TRAINER.{self.cfg_node}.{key}={c[key]!r} is not supported by {type(self).__name__} "
                                  f"(only {default!r}; the official code ignores this key)")

    # ------------------------------------------------------------------ build
    def build_model(self) -> None:
        cfg = self.cfg
        print(f"Loading CLIP (backbone: {cfg.MODEL.BACKBONE.NAME})")
        bundle = load_clip_to_cpu(cfg)
        clip_model = freeze(bundle.model)
        self.prec = self.resolve_precision(self.node().PREC)
        self.context_length = bundle.context_length
        self.logit_scale = bundle.logit_scale
        print("Building the prompt model (CLIP's image and text encoders stay frozen)")
        module = self.build_prompt_model(clip_model, self.dm.dataset.classnames)  # built from fp32 CLIP
        if self.prec in ("fp16", "bf16"):
            clip_model.to(torch.float16 if self.prec == "fp16" else torch.bfloat16)
        self.clip_model = clip_model.to(self.device).eval()
        self.image_encoder = self.clip_model.visual
        attach_local_encoder(self)
        self.text_encoder = TextEncoder(self.clip_model)
        if self.prec in ("fp16", "bf16") and not self.node().get("FP32_PARAMS", False):
            module.to(torch.float16 if self.prec == "fp16" else torch.bfloat16)   # official: params follow CLIP
        module = module.to(self.device)
        if cfg.MODEL.INIT_WEIGHTS:  # upstream CoOp: every entry whose name and shape match is loaded
            load_pretrained_weights(module, cfg.MODEL.INIT_WEIGHTS)
        self.precision_info = {**getattr(self, "precision_info", {}),
                               "learnable_params": str(next(module.parameters()).dtype).replace("torch.", "")}
        trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
        print(f"Parameters to be updated ({self.model_name}): {trainable}")
        self.register_prompt_model(module)
        self.scaler = (torch.amp.GradScaler("cuda") if self.prec == "amp" and self.device.type == "cuda"
                       else None)
        print(f"Precision: {self.prec} (requested {self.node().PREC}; learnable parameters "
              f"{self.precision_info['learnable_params']})")

    def build_prompt_model(self, clip_model: nn.Module, classnames: list[str]) -> nn.Module:
        raise NotImplementedError

    def register_prompt_model(self, module: nn.Module) -> None:
        """Optimiser, scheduler and registration (``model_name``) of the built, cast and moved prompt module;
        a trainer that steps and checkpoints several parts separately overrides this (BCAL)."""
        self.optim = build_optimizer(module, self.cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, self.cfg.OPTIM)
        self.register_model(self.model_name, module, self.optim, self.sched)

    # ------------------------------------------------------------------ forward
    def autocast(self) -> Any:
        if self.prec == "amp":
            return torch.autocast(device_type=self.device.type)
        return contextlib.nullcontext()

    def image_features(self, images: torch.Tensor,
                       batch: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen image features, upcast to fp32: ``(L2-normalised, raw)``."""
        raw = upcast(self.encode_images(images, batch))
        return raw / raw.norm(dim=-1, keepdim=True), raw

    def image_features_local(self, images: torch.Tensor,
                             batch: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen image features, upcast to fp32: ``(L2-normalised, raw, L2-normalised local (N, R, D))``."""
        raw, local = (upcast(t) for t in self.encode_images_local(images, batch))
        return raw / raw.norm(dim=-1, keepdim=True), raw, local / local.norm(dim=-1, keepdim=True)

    def forward_logits_local(self, feats: torch.Tensor, raw: torch.Tensor, local: torch.Tensor,
                             domains: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, C], local logits [N, R, C])`` against the same class text features (trainers with
        ``LOCAL_FEATURES``; ``local`` is L2-normalised)."""
        raise NotImplementedError(f"{type(self).__name__} yields no local logits")

    def forward_logits(self, feats: torch.Tensor, raw: torch.Tensor,
                       domains: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[N, C]`` from normalised (``feats``) and raw (``raw``) fp32 image features; ``domains`` [N]
        are the batch's domain labels where known (subclasses)."""
        raise NotImplementedError

    def optimisation_step(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.model_zero_grad()
            self.detect_anomaly(loss)
            self.scaler.scale(loss).backward()
            for name in self.get_model_names():
                self.scaler.step(self._optims[name])
            self.scaler.update()
        else:
            self.model_backward_and_update(loss)

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        image, label = self.parse_batch_train(batch)
        domains = batch["domain"].to(self.device) if "domain" in batch else None
        with self.autocast():
            feats, raw = self.image_features(image, batch)
            logits = upcast(self.forward_logits(feats, raw, domains))
            loss = F.cross_entropy(logits, label)
        self.optimisation_step(loss)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        acc = (logits.argmax(1) == label).sum().item() * (100.0 / label.numel())   # Dassl's compute_accuracy
        return {"loss": loss.item(), "acc": acc}

    def model_inference(self, input: Any) -> InferenceOutput:
        """Logits and normalised image features (score: their energy), plus the local logits when this pass asks
        for them (``infer_local``); ``input`` is the image batch, or ``(images, domains)`` for trainers whose
        :meth:`parse_batch_test` passes the domain labels on."""
        images, domains = input if isinstance(input, (tuple, list)) else (input, None)
        local_logits = None
        with self.autocast():
            if self.infer_local:
                feats, raw, local = self.image_features_local(images)
                logits, local_logits = (upcast(t) for t in self.forward_logits_local(feats, raw, local, domains))
            else:
                feats, raw = self.image_features(images)
                logits = upcast(self.forward_logits(feats, raw, domains))
        feats = upcast(feats)
        return InferenceOutput(logits=logits, features=feats, local_logits=local_logits)


class ContextPromptTrainer(PromptCLIPTrainer):
    """CoOp's prompt model, shared by CoOp and LoCoOp: one :class:`PromptLearner` built from ``TRAINER.<node>``
    (``N_CTX``, ``CTX_INIT``, ``CSC``, ``CLASS_TOKEN_POSITION``) and ``logits = s * cos(image, text_c)`` for the
    global and the local image features against the same class text features."""

    LOCAL_FEATURES = True  # local logits for gl_mcm / l_mcm

    @staticmethod
    def context_cfg() -> CN:
        """The prompt keys of ``TRAINER.<node>`` with CoOp's official defaults (a subclass's ``extend_cfg`` adds
        its own)."""
        c = CN()
        c.N_CTX = 16                    # number of context tokens (ignored when CTX_INIT is set)
        c.CTX_INIT = ""                 # e.g. "a photo of a": initialise from these word embeddings
        c.CSC = False                   # class-specific context
        c.CLASS_TOKEN_POSITION = "end"  # end | middle | front
        c.PREC = "fp16"                 # fp32 | fp16 | amp | bf16 (official fp16; CPU: always fp32)
        c.FP32_PARAMS = False  # named fix: fp32 learnable context under fp16/bf16 (official: CLIP dtype)
        return c

    def check_cfg(self, cfg: Any) -> None:
        super().check_cfg(cfg)
        pos = self.node(cfg).CLASS_TOKEN_POSITION
        if pos not in CLASS_TOKEN_POSITIONS:
            raise ConfigError(f"TRAINER.{self.cfg_node}.CLASS_TOKEN_POSITION must be one of "
                              f"{CLASS_TOKEN_POSITIONS}, got {pos!r}")

    def build_prompt_model(self, clip_model: nn.Module, classnames: list[str]) -> nn.Module:
        c = self.node()
        self.prompt_learner = PromptLearner(clip_model, self.context_length, classnames, int(c.N_CTX),
                                            c.CTX_INIT, bool(c.CSC), c.CLASS_TOKEN_POSITION)
        return self.prompt_learner

    def text_features(self) -> torch.Tensor:
        """Normalised class text features ``[C, D]`` of the current context."""
        pl = self.prompt_learner
        tf = encode_prompt_embeddings(self.text_encoder, pl(), pl.tokenized_prompts)
        return tf / tf.norm(dim=-1, keepdim=True)

    def forward_logits(self, feats: torch.Tensor, raw: torch.Tensor,
                       domains: Optional[torch.Tensor] = None) -> torch.Tensor:
        tf = self.text_features()
        return self.logit_scale * feats.to(tf.dtype) @ tf.t()

    def forward_logits_local(self, feats: torch.Tensor, raw: torch.Tensor, local: torch.Tensor,
                             domains: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        tf = self.text_features()
        return self.logit_scale * feats.to(tf.dtype) @ tf.t(), self.logit_scale * local.to(tf.dtype) @ tf.t()
