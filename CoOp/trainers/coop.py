"""``CoOp`` trainer (Zhou et al., IJCV 2022) as used as a baseline by the official CRoFT code.
The prompt machinery it shares with LoCoOp, CoCoOp and DPLCLIP lives in :mod:`trainers.prompting` and
:mod:`trainers.prompt_trainer` (:class:`~trainers.prompt_trainer.ContextPromptTrainer`).

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

from typing import Any

from dassl.config.validate import PREC, count
from dassl.engine import TRAINER_REGISTRY

from .prompt_trainer import ContextPromptTrainer


# ----------------------------------------------------------------------------------------------- CoOp
@TRAINER_REGISTRY.register()
class CoOp(ContextPromptTrainer):
    """Context Optimization: learnable prompt context, frozen CLIP, cross-entropy."""

    CFG_RANGES = {"TRAINER.COOP.N_CTX": count(0, "ignored with CTX_INIT; >= 1 without it"), "TRAINER.COOP.PREC": PREC}

    cfg_node = "COOP"

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        cfg.TRAINER.COOP = ContextPromptTrainer.context_cfg()
