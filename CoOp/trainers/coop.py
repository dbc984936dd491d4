"""``CoOp`` trainer (Zhou et al., IJCV 2022) as used as a baseline by the official CRoFT code.
The prompt machinery it shares with CoCoOp and DPLCLIP lives in :mod:`trainers.prompting` and
:mod:`trainers.prompt_trainer`.

CoOp learns ``N_CTX`` context token embeddings ``v_1..v_M`` that replace the words of a prompt: the text encoder
reads ``[SOS] v_1 ... v_M {classname} . [EOS]`` (class token at the ``end``; ``middle`` and ``front`` are also
available), CLIP's image and text encoders stay frozen, ``logits = s * cos(image, text_c)`` with CLIP's logit
scale ``s``, plain cross-entropy. The context is generic (shared by all classes) or class-specific (``CSC``),
initialised N(0, 0.02^2) or from the word embeddings of ``CTX_INIT`` (e.g. ``"a photo of a"``; ``N_CTX`` is then
the number of tokens of that text). Only the prompt learner trains (checkpoint model name ``prompt_learner``); its
``token_prefix``/``token_suffix`` buffers (the fixed [SOS] and class-name embeddings) are saved but dropped when a
model is loaded for evaluation, so a checkpoint works with the current class names.

Inference returns ``InferenceOutput(logits, normalised image features)`` (score: the energy logsumexp(logits)), and,
when a score reads them (``gl_mcm``, ``l_mcm``), the local logits ``s * cos(region, text_c)`` of the image's local
features (:mod:`clip_backbone.local`) against the same prompts. Precision
handling (``PREC``): see :mod:`trainers.prompt_trainer`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from dassl.config.validate import PREC, count
from dassl.engine import TRAINER_REGISTRY
from dassl.utils.errors import ConfigError

from .prompt_trainer import PromptCLIPTrainer
from .prompting import CLASS_TOKEN_POSITIONS, PromptLearner, encode_prompt_embeddings


# ----------------------------------------------------------------------------------------------- CoOp
@TRAINER_REGISTRY.register()
class CoOp(PromptCLIPTrainer):
    """Context Optimization: learnable prompt context, frozen CLIP, cross-entropy."""

    CFG_RANGES = {"TRAINER.COOP.N_CTX": count(0, "ignored with CTX_INIT; >= 1 without it"), "TRAINER.COOP.PREC": PREC}

    cfg_node = "COOP"
    LOCAL_FEATURES = True  # local logits for gl_mcm / l_mcm

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        c = cfg.TRAINER.COOP = CN()
        c.N_CTX = 16                    # number of context tokens (ignored when CTX_INIT is set)
        c.CTX_INIT = ""                 # e.g. "a photo of a": initialise from these word embeddings
        c.CSC = False                   # class-specific context
        c.CLASS_TOKEN_POSITION = "end"  # end | middle | front
        c.PREC = "fp16"                 # fp32 | fp16 | amp | bf16 (CPU: always fp32)
        c.FP32_PARAMS = False  # named fix: fp32 learnable parameters under fp16/bf16 (official: CLIP dtype)

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

    def forward_logits_local(self, feats: torch.Tensor, raw: torch.Tensor, local: torch.Tensor,
                             domains: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        tf = self.text_features()
        return self.logit_scale * feats.to(tf.dtype) @ tf.t(), self.logit_scale * local.to(tf.dtype) @ tf.t()
