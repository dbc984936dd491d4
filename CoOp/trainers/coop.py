"""``CoOp`` trainer (Zhou et al., IJCV 2022) as used as a baseline by the official CRoFT code, plus the prompt
machinery shared with :mod:`trainers.cocoop` and :mod:`trainers.dplclip`.

CoOp learns ``N_CTX`` context token embeddings ``v_1..v_M`` that replace the words of a prompt: the text encoder
reads ``[SOS] v_1 ... v_M {classname} . [EOS]`` (class token at the ``end``; ``middle`` and ``front`` are also
available), CLIP's image and text encoders stay frozen, ``logits = s * cos(image, text_c)`` with CLIP's logit
scale ``s``, plain cross-entropy. The context is generic (shared by all classes) or class-specific (``CSC``),
initialised N(0, 0.02^2) or from the word embeddings of ``CTX_INIT`` (e.g. ``"a photo of a"``; ``N_CTX`` is then
the number of tokens of that text). Only the prompt learner trains (checkpoint model name ``prompt_learner``); its
``token_prefix``/``token_suffix`` buffers (the fixed [SOS] and class-name embeddings) are saved but dropped when a
model is loaded for evaluation, so a checkpoint works with the current class names.

Inference returns ``[logits, normalised image features, energy]`` with energy = logsumexp(logits).

Precision (``PREC``): ``fp32``; ``fp16``/``bf16`` = frozen CLIP weights cast to that dtype while the learnable
parts stay fp32 (prompts are cast to the text encoder's dtype, text/image features back to fp32 for the logits);
``amp`` = fp32 weights under ``torch.autocast`` with a ``GradScaler`` on CUDA. The official code keeps the learnable
context itself in fp16 for ``fp16``. On CPU every mode runs in fp32 (:meth:`SimpleTrainer.resolve_precision`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from clip_backbone import TextEncoder, tokenize
from dassl.engine import TRAINER_REGISTRY, TrainerX
from dassl.optim import build_lr_scheduler, build_optimizer
from dassl.utils.errors import ConfigError

from .clip_common import freeze, load_clip_to_cpu

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
PROMPT_PRECISIONS = ("fp32", "fp16", "amp", "bf16")


# ----------------------------------------------------------------------------------------------- prompt pieces
def clip_embed_dim(clip_model: nn.Module) -> int:
    """Dimension D of CLIP's joint image/text embedding."""
    proj = clip_model.text_projection
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])


def count_tokens(text: str, context_length: int) -> int:
    """Number of BPE tokens of ``text`` (without [SOS]/[EOS])."""
    ids = tokenize([text], context_length)[0]
    return int((ids != 0).sum().item()) - 2


class PromptTokens:
    """Token ids and fixed embeddings of ``"<prefix_text> {classname}."`` for every class.

    ``prefix_len`` tokens after [SOS] are the slots that learnable context replaces. ``prefix`` is the [SOS]
    embedding ``[C, 1, width]``, ``suffix`` the rest ``[C, L - 1 - prefix_len, width]`` (class name, ".", [EOS],
    padding); ``name_lens`` the number of class-name tokens (needed for ``middle``/``front``).
    """

    def __init__(self, clip_model: nn.Module, context_length: int, classnames: Sequence[str], prefix_text: str,
                 prefix_len: int) -> None:
        names = [c.replace("_", " ") for c in classnames]
        texts = [f"{prefix_text} {n}." for n in names]
        self.tokenized = tokenize(texts, context_length)
        self.name_lens = [count_tokens(n, context_length) for n in names]
        eot = self.tokenized.argmax(dim=-1)
        expected = torch.tensor([1 + prefix_len + n + 1 for n in self.name_lens])
        if not torch.equal(eot, expected):
            bad = [names[i] for i in range(len(names)) if eot[i] != expected[i]]
            raise ConfigError(f"prompt does not fit the text encoder's context length {context_length} "
                              f"(N_CTX {prefix_len} + class names {bad[:3]}); use fewer context tokens")
        emb = clip_model.token_embedding
        with torch.no_grad():
            embedding = emb(self.tokenized.to(emb.weight.device)).float().cpu()
        self.prefix = embedding[:, :1, :]
        self.suffix = embedding[:, 1 + prefix_len:, :]
        self.n_ctx = prefix_len

    def attach(self, module: nn.Module) -> None:
        """Register the frozen prompt pieces on a prompt learner (``token_prefix``/``token_suffix`` are saved and
        dropped on load; ``tokenized_prompts`` is not saved) and set ``name_lens``, ``n_cls``, ``n_ctx``."""
        module.register_buffer("token_prefix", self.prefix)
        module.register_buffer("token_suffix", self.suffix)
        module.register_buffer("tokenized_prompts", self.tokenized, persistent=False)
        module.name_lens = self.name_lens
        module.n_cls = self.prefix.shape[0]
        module.n_ctx = self.n_ctx


def assemble_prompts(prefix: torch.Tensor, ctx: torch.Tensor, suffix: torch.Tensor, name_lens: Sequence[int],
                     position: str = "end") -> torch.Tensor:
    """Token embeddings ``[..., C, L, width]`` of the prompts with context ``ctx``.

    ``prefix`` ``[C, 1, w]`` and ``suffix`` ``[C, S, w]`` are the fixed pieces; ``ctx`` is ``[M, w]`` (generic),
    ``[C, M, w]`` (class-specific) or ``[..., C, M, w]`` (e.g. one context per image or per domain). Leading
    dimensions of ``ctx`` broadcast over the fixed pieces.
    """
    n_cls = prefix.shape[0]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
    lead = ctx.shape[:-3]
    prefix = prefix.to(ctx.dtype).expand(*lead, *prefix.shape)
    suffix = suffix.to(ctx.dtype).expand(*lead, *suffix.shape)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=-2)
    if position not in ("middle", "front"):
        raise ConfigError(f"CLASS_TOKEN_POSITION must be one of {CLASS_TOKEN_POSITIONS}, got {position!r}")
    half = ctx.shape[-2] // 2
    rows = []
    for i, n in enumerate(name_lens):
        pre, c, suf = prefix[..., i, :, :], ctx[..., i, :, :], suffix[..., i, :, :]
        name, rest = suf[..., :n, :], suf[..., n:, :]
        if position == "middle":
            rows.append(torch.cat([pre, c[..., :half, :], name, c[..., half:, :], rest], dim=-2))
        else:
            rows.append(torch.cat([pre, name, c, rest], dim=-2))
    return torch.stack(rows, dim=-3)


def encode_prompt_embeddings(text_encoder: TextEncoder, prompts: torch.Tensor,
                             tokenized: torch.Tensor) -> torch.Tensor:
    """fp32 text features of prompt embeddings ``[..., C, L, w]`` (tokenized ``[C, L]``) -> ``[..., C, D]``."""
    lead = prompts.shape[:-3]
    n_cls, length, width = prompts.shape[-3:]
    flat = prompts.reshape(-1, length, width).to(text_encoder.dtype)
    tok = tokenized.repeat(flat.shape[0] // n_cls, 1)
    return text_encoder(flat, tok).float().reshape(*lead, n_cls, -1)


def init_context(clip_model: nn.Module, context_length: int, n_ctx: int, ctx_init: str, n_cls: int = 0,
                 csc: bool = False) -> tuple[torch.Tensor, str, int]:
    """Initial context ``[M, w]`` (or ``[C, M, w]`` when ``csc``), the prompt prefix text and M.

    ``ctx_init`` given: the word embeddings of that text (M = its token count); else N(0, 0.02^2) and the
    placeholder prefix ``"X X ... X"``.
    """
    width = clip_model.token_embedding.weight.shape[1]
    if ctx_init:
        text = ctx_init.replace("_", " ").strip()
        n = count_tokens(text, context_length)
        if n < 1:
            raise ConfigError(f"CTX_INIT {ctx_init!r} has no tokens")
        emb = clip_model.token_embedding
        with torch.no_grad():
            vectors = emb(tokenize([text], context_length).to(emb.weight.device))[0, 1:1 + n].float().cpu()
        if csc:
            vectors = vectors.unsqueeze(0).repeat(n_cls, 1, 1)
        return vectors.clone(), text, n
    if n_ctx < 1:
        raise ConfigError(f"N_CTX must be >= 1 without CTX_INIT, got {n_ctx}")
    vectors = torch.empty(n_cls, n_ctx, width) if csc else torch.empty(n_ctx, width)
    nn.init.normal_(vectors, std=0.02)
    return vectors, " ".join(["X"] * n_ctx), n_ctx


class PromptLearner(nn.Module):
    """CoOp's learnable context ``ctx`` + the fixed ``token_prefix``/``token_suffix`` buffers."""

    def __init__(self, clip_model: nn.Module, context_length: int, classnames: Sequence[str], n_ctx: int = 16,
                 ctx_init: str = "", csc: bool = False, class_token_position: str = "end") -> None:
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ConfigError(f"CLASS_TOKEN_POSITION must be one of {CLASS_TOKEN_POSITIONS}, "
                              f"got {class_token_position!r}")
        vectors, prefix_text, n_ctx = init_context(clip_model, context_length, n_ctx, ctx_init, len(classnames),
                                                   csc)
        print(f'Initial context: "{prefix_text}"  ({"class-specific" if csc else "generic"}, '
              f"{n_ctx} tokens, class token: {class_token_position})")
        self.ctx = nn.Parameter(vectors)
        PromptTokens(clip_model, context_length, classnames, prefix_text, n_ctx).attach(self)
        self.class_token_position = class_token_position

    def forward(self) -> torch.Tensor:
        return assemble_prompts(self.token_prefix, self.ctx, self.token_suffix, self.name_lens,
                                self.class_token_position)


# ----------------------------------------------------------------------------------------------- trainer base
class PromptCLIPTrainer(TrainerX):
    """What CoOp, CoCoOp and DPLCLIP share: frozen CLIP in the requested precision, a text encoder over prompt
    embeddings, and one optimisation step with optional AMP. Subclasses set ``cfg_node`` and implement
    ``build_prompt_model`` and ``forward_logits``."""

    cfg_node = ""         # name of the TRAINER.<node> config node
    model_name = "prompt_learner"
    # keys the official extend_cfg declares for this trainer (so the official scripts' overrides merge) but the
    # trainer does not implement: only the default value is accepted (the official code ignores them silently)
    unsupported_keys: dict[str, Any] = {}

    def node(self, cfg: Any = None) -> Any:
        return (cfg or self.cfg).TRAINER[self.cfg_node]

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
        self.text_encoder = TextEncoder(self.clip_model)
        module = module.to(self.device)
        trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
        print(f"Parameters to be updated ({self.model_name}): {trainable}")
        self.optim = build_optimizer(module, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model(self.model_name, module, self.optim, self.sched)
        self.scaler = (torch.amp.GradScaler("cuda") if self.prec == "amp" and self.device.type == "cuda"
                       else None)
        print(f"Precision: {self.prec} (requested {self.node().PREC})")

    def build_prompt_model(self, clip_model: nn.Module, classnames: list[str]) -> nn.Module:
        raise NotImplementedError

    # ------------------------------------------------------------------ forward
    def autocast(self) -> Any:
        if self.prec == "amp":
            return torch.autocast(device_type=self.device.type)
        return contextlib.nullcontext()

    def image_features(self, images: torch.Tensor,
                       batch: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen image features in fp32: ``(L2-normalised, raw)``."""
        raw = self.encode_images(images, batch).float()
        return raw / raw.norm(dim=-1, keepdim=True), raw

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
            logits = self.forward_logits(feats, raw, domains).float()
            loss = F.cross_entropy(logits, label)
        self.optimisation_step(loss)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return {"loss": loss.item(), "acc": (logits.argmax(1) == label).float().mean().item() * 100.0}

    def model_inference(self, input: Any) -> list[torch.Tensor]:
        """``[logits, normalised image features, energy]``; ``input`` is the image batch, or ``(images,
        domains)`` for trainers whose :meth:`parse_batch_test` passes the domain labels on."""
        images, domains = input if isinstance(input, (tuple, list)) else (input, None)
        with self.autocast():
            feats, raw = self.image_features(images)
            logits = self.forward_logits(feats, raw, domains).float()
        feats = feats.float()
        return [logits, feats, torch.logsumexp(logits, dim=1)]


# ----------------------------------------------------------------------------------------------- CoOp
@TRAINER_REGISTRY.register()
class CoOp(PromptCLIPTrainer):
    """Context Optimization: learnable prompt context, frozen CLIP, cross-entropy."""

    cfg_node = "COOP"

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        c = cfg.TRAINER.COOP = CN()
        c.N_CTX = 16                    # number of context tokens (ignored when CTX_INIT is set)
        c.CTX_INIT = ""                 # e.g. "a photo of a": initialise from these word embeddings
        c.CSC = False                   # class-specific context
        c.CLASS_TOKEN_POSITION = "end"  # end | middle | front
        c.PREC = "fp16"                 # fp32 | fp16 | amp | bf16 (CPU: always fp32)

    def check_cfg(self, cfg: Any) -> None:
        super().check_cfg(cfg)
        pos = cfg.TRAINER.COOP.CLASS_TOKEN_POSITION
        if pos not in CLASS_TOKEN_POSITIONS:
            raise ConfigError(f"TRAINER.COOP.CLASS_TOKEN_POSITION must be one of {CLASS_TOKEN_POSITIONS}, "
                              f"got {pos!r}")

    def build_prompt_model(self, clip_model: nn.Module, classnames: list[str]) -> nn.Module:
        c = self.cfg.TRAINER.COOP
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
