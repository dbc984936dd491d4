"""Zero-shot CLIP (no training): ``ZeroshotCLIP`` (one template) and ``ZeroshotCLIP2`` (7-template ensemble).

Precision ``TRAINER.ZSCLIP.PREC`` (official default ``fp16``: the official code runs CLIP's fp16 weights on the GPU):
``fp16``/``bf16`` cast the whole CLIP (text features are computed in that dtype), ``amp`` runs fp32 weights under
autocast, ``fp32``; CPU always runs fp32. Logits are computed in fp32 from the (L2-normalised) features. When a
score reads them (``gl_mcm``, ``l_mcm``) inference also returns the local logits ``s * cos(region, text_c)`` of the
image's local features (:mod:`clip_backbone.local`) against the same class text features.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from yacs.config import CfgNode as CN

from dassl.config.validate import PREC
from dassl.engine import TRAINER_REGISTRY, TrainerX
from dassl.engine.inference import InferenceOutput

from .clip_common import attach_local_encoder, freeze, load_clip_to_cpu, region_logits, single_template, text_features


@TRAINER_REGISTRY.register()
class ZeroshotCLIP(TrainerX):
    """logits = s * cos(image, class prompt); returns ``InferenceOutput(logits, features)``."""

    cfg_node = "ZSCLIP"  # the TRAINER.<node> this trainer reads
    LOCAL_FEATURES = True  # local logits for gl_mcm / l_mcm
    dataset_signature = staticmethod(single_template)  # derived from DATASET.NAME (one evaluation pass must agree)
    CFG_RANGES = {"TRAINER.ZSCLIP.PREC": PREC}

    text_mode = "single"

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        c = cfg.TRAINER.ZSCLIP = CN()
        c.PREC = "fp16"   # fp32 | fp16 | amp | bf16 (official fp16; CPU: always fp32)

    def build_model(self) -> None:
        cfg = self.cfg
        classnames = self.dm.dataset.classnames
        print(f"Loading CLIP (backbone: {cfg.MODEL.BACKBONE.NAME})")
        bundle = load_clip_to_cpu(cfg)
        self.prec = self.resolve_precision(cfg.TRAINER.ZSCLIP.PREC)
        self.clip_model = freeze(bundle.model).to(self.device)
        if self.prec in ("fp16", "bf16"):
            self.clip_model.to(torch.float16 if self.prec == "fp16" else torch.bfloat16)
        print(f"Precision: {self.prec} (requested {cfg.TRAINER.ZSCLIP.PREC})")
        self.image_encoder = self.clip_model.visual
        attach_local_encoder(self)
        tpl = single_template(cfg)
        print(f"Prompt template: {tpl!r} ({self.text_mode})")
        tf = text_features(bundle, classnames, self.text_mode, tpl, self.device)
        self.text_feats = tf / tf.norm(dim=-1, keepdim=True)
        self.logit_scale = bundle.logit_scale

    def model_inference(self, input: torch.Tensor) -> InferenceOutput:
        amp = self.prec == "amp"
        local = None
        with torch.autocast(device_type=self.device.type) if amp else contextlib.nullcontext():
            if self.infer_local:
                feats, local = self.encode_images_local(input)
            else:
                feats = self.encode_images(input)
        feats = feats.float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = self.logit_scale * feats @ self.text_feats.t()
        local_logits = None if local is None else region_logits(local, self.text_feats, self.logit_scale)
        return InferenceOutput(logits=logits, features=feats, local_logits=local_logits)

    def set_model_mode(self, mode: str = "train", names: Any = None) -> None:
        self.clip_model.eval()

    def train(self, start_epoch: int = 0, max_epoch: int = 0) -> None:
        """Zero-shot: no training; evaluate on the test split like the official eval-only path."""
        self.time_start = __import__("time").time()
        print("ZeroshotCLIP has nothing to train: evaluating on the test set")
        self.metrics["test"] = dict(self.test(split="test"))


@TRAINER_REGISTRY.register()
class ZeroshotCLIP2(ZeroshotCLIP):
    """The 7 ImageNet templates plus the dataset's template, averaged (unused by the official scripts)."""

    text_mode = "ensemble7+custom"
