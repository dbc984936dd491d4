"""``CoCoOp`` trainer (Zhou et al., CVPR 2022) as used as a baseline by the official CRoFT code.

CoOp's generic context ``v_1..v_M`` (``N_CTX`` tokens, N(0, 0.02^2) or ``CTX_INIT``) plus a meta-net
``Linear(D -> D/16) -> ReLU -> Linear(D/16 -> width)`` that maps the normalised image feature ``x`` to a bias
``pi(x)`` added to every context token: the prompt of class c for image x is ``[SOS] v_1+pi(x) ... v_M+pi(x)
{classname} . [EOS]``. Text features are therefore computed per image (batched here: ``N * C`` prompts per
call, chunked at inference), ``logits[n, c] = s * cos(x_n, t_c(x_n))``, plain cross-entropy. Only the prompt
learner (context + meta-net) trains (checkpoint model name ``prompt_learner``).

Inference returns ``InferenceOutput(logits, normalised image features)``. Precision handling as in
:mod:`trainers.prompt_trainer`: under ``PREC fp16`` the whole prompt learner, context and meta-net, is cast to fp16
as officially (the official context takes CLIP's dtype and the meta-net is ``.half()``-ed); the named fix
``FP32_PARAMS True`` keeps both fp32. The meta-net reads the L2-normalised image feature.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from dassl.config.validate import PREC, count
from dassl.engine import TRAINER_REGISTRY

from .prompt_trainer import PromptCLIPTrainer
from .prompting import PromptTokens, assemble_prompts, clip_embed_dim, encode_prompt_embeddings, init_context

# at inference, at most this many prompts go through the text encoder at once (memory bound, same results)
INFERENCE_PROMPTS_PER_CALL = 4096


class CoCoOpPromptLearner(nn.Module):
    """Context ``ctx`` [M, w], the meta-net and the fixed ``token_prefix``/``token_suffix`` buffers."""

    def __init__(self, clip_model: nn.Module, context_length: int, classnames: Sequence[str], n_ctx: int = 16,
                 ctx_init: str = "") -> None:
        super().__init__()
        vectors, prefix_text, n_ctx = init_context(clip_model, context_length, n_ctx, ctx_init)
        print(f'Initial context: "{prefix_text}"  ({n_ctx} tokens)')
        self.ctx = nn.Parameter(vectors)
        vis_dim = clip_embed_dim(clip_model)
        width = vectors.shape[-1]
        hidden = max(1, vis_dim // 16)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, width)),
        ]))
        PromptTokens(clip_model, context_length, classnames, prefix_text, n_ctx).attach(self)

    def forward(self, im_features: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``[N, C, L, w]`` for normalised image features ``[N, D]``."""
        bias = self.meta_net(im_features.to(self.ctx.dtype))              # [N, w]
        ctx = self.ctx.unsqueeze(0) + bias.unsqueeze(1)                    # [N, M, w]
        ctx = ctx.unsqueeze(1).expand(-1, self.n_cls, -1, -1)              # [N, C, M, w]
        return assemble_prompts(self.token_prefix, ctx, self.token_suffix, self.name_lens, "end")


@TRAINER_REGISTRY.register()
class CoCoOp(PromptCLIPTrainer):
    """Conditional Context Optimization: image-conditioned prompt context."""

    CFG_RANGES = {"TRAINER.COCOOP.N_CTX": count(0, "ignored with CTX_INIT; >= 1 without it"), "TRAINER.COCOOP.PREC": PREC}

    cfg_node = "COCOOP"
    unsupported_keys = {"CSC": False, "CLASS_TOKEN_POSITION": "end"}

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        c = cfg.TRAINER.COCOOP = CN()
        c.N_CTX = 16          # number of context tokens (ignored when CTX_INIT is set)
        c.CTX_INIT = ""       # e.g. "a photo of a" (the original CoCoOp setting; the CRoFT scripts use 16 random)
        c.PREC = "fp16"       # fp32 | fp16 | amp | bf16 (CPU: always fp32)
        c.FP32_PARAMS = False  # named fix: fp32 learnable parameters under fp16/bf16 (official: CLIP dtype)
        c.CSC = False                   # official key, passed by the official scripts; only False is supported
        c.CLASS_TOKEN_POSITION = "end"  # official key, passed by the official scripts; only "end" is supported

    def build_prompt_model(self, clip_model: nn.Module, classnames: list[str]) -> nn.Module:
        c = self.cfg.TRAINER.COCOOP
        self.prompt_learner = CoCoOpPromptLearner(clip_model, self.context_length, classnames, int(c.N_CTX),
                                                  c.CTX_INIT)
        return self.prompt_learner

    def per_image_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Normalised text features ``[N, C, D]`` conditioned on each image."""
        pl = self.prompt_learner
        tf = encode_prompt_embeddings(self.text_encoder, pl(feats), pl.tokenized_prompts)
        return tf / tf.norm(dim=-1, keepdim=True)

    def forward_logits(self, feats: torch.Tensor, raw: torch.Tensor,
                       domains: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.is_grad_enabled():
            chunks = [feats]
        else:
            step = max(1, INFERENCE_PROMPTS_PER_CALL // self.prompt_learner.n_cls)
            chunks = list(feats.split(step))
        logits = []
        for f in chunks:
            tf = self.per_image_text_features(f)
            logits.append(self.logit_scale * torch.einsum("nd,ncd->nc", f.to(tf.dtype), tf))
        return torch.cat(logits)
