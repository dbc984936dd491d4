"""``CLIP_Adapter`` trainer (Gao et al., 2021) as used as a baseline by the official CRoFT code.

Frozen CLIP; an image-side bottleneck MLP ``Linear(D -> D/r, no bias) -> ReLU -> Linear(D/r -> D, no bias) -> ReLU``
whose output is mixed residually with the frozen feature: ``f = RATIO * adapter(x) + (1 - RATIO) * x``;
``logits = s * cos(f, t_c)`` with single-template class text features ``t_c`` and CLIP's logit scale ``s``.
Plain cross-entropy; only the adapter trains (checkpoint model name ``clip_adapter``).

Inference returns ``InferenceOutput(logits, normalised adapted image features)`` (score: logsumexp(logits)), so the
common evaluator (accuracy, energy / MCM / MSP / KNN detection) applies unchanged.

Differences from the official ``CLIP_Adapter.py`` (same results where it runs):

* The text features are computed once (:meth:`FeatureHeadTrainer.frozen_text`: again only when CLIP's dtype or
  device changes); the official code re-encodes the (frozen) prompts on every forward, which gives the same
  values.
* The prompt template comes from :func:`trainers.clip_common.single_template`, which covers every dataset
  (``"a photo of a {}."`` by default). The official template dict has no ``ImageNetOOD46`` entry and raises a
  ``KeyError`` in Setup-I evaluation.
* ``RATIO`` and ``REDUCTION`` are config keys (the official code hard-codes 0.2 and 4, the defaults here).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from dassl.config.validate import PREC, count, unit
from dassl.engine import TRAINER_REGISTRY
from dassl.optim import build_lr_scheduler, build_optimizer
from dassl.utils.errors import ConfigError

from .clip_common import FeatureHeadTrainer, setup_frozen_clip, single_template, text_features
from .prompting import upcast


class BottleneckAdapter(nn.Module):
    """``Linear(D, D // reduction, bias=False) -> ReLU -> Linear(D // reduction, D, bias=False) -> ReLU``."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ConfigError(f"TRAINER.CLIP_ADAPTER.REDUCTION={reduction} leaves no hidden unit for D={dim}")
        self.fc = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(hidden, dim, bias=False), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def clip_adapter_logits(adapter: nn.Module, feats: torch.Tensor, text_feats: torch.Tensor, ratio: float,
                        logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual mix, L2 normalisation and scaled cosine logits; returns ``(logits, normalised features)``."""
    mixed = ratio * adapter(feats) + (1.0 - ratio) * feats
    mixed = mixed / mixed.norm(dim=-1, keepdim=True)
    return logit_scale * mixed @ text_feats.t(), mixed


@TRAINER_REGISTRY.register()
class CLIP_Adapter(FeatureHeadTrainer):
    """CLIP-Adapter: residual bottleneck adapter on frozen CLIP image features, single-template classifier."""

    cfg_node = "CLIP_ADAPTER"  # the TRAINER.<node> this trainer reads
    dataset_signature = staticmethod(single_template)  # derived from DATASET.NAME (one evaluation pass must agree)

    CFG_RANGES = {"TRAINER.CLIP_ADAPTER.RATIO": unit("residual ratio"), "TRAINER.CLIP_ADAPTER.REDUCTION": count(1),
                  "TRAINER.CLIP_ADAPTER.PREC": PREC}

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        c = cfg.TRAINER.CLIP_ADAPTER = CN()
        c.RATIO = 0.2       # residual ratio (official: hard-coded 0.2)
        c.REDUCTION = 4     # bottleneck reduction (official: hard-coded 4)
        c.PREC = "fp32"     # precision of the frozen image encoder (official: clip_model.float()); adapter is fp32

    def build_model(self) -> None:
        cfg = self.cfg
        c = cfg.TRAINER.CLIP_ADAPTER
        self.clip_bundle, prec = setup_frozen_clip(self, c.PREC)
        self.template = single_template(cfg)
        print(f"Prompt template: {self.template!r}")
        self.ratio = float(c.RATIO)
        print(f"CLIP-Adapter: ratio {self.ratio}, reduction {int(c.REDUCTION)}")
        self.adapter = BottleneckAdapter(self.text_feats.shape[1], int(c.REDUCTION)).to(self.device)
        self.optim = build_optimizer(self.adapter, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("clip_adapter", self.adapter, self.optim, self.sched)

    def raw_text_features(self) -> torch.Tensor:
        """Unnormalised single-template class text features ``[C, D]`` of the frozen CLIP."""
        return text_features(self.clip_bundle, self.dm.dataset.classnames, "single", self.template, self.device)

    @property
    def text_feats(self) -> torch.Tensor:
        """L2-normalised class text features ``[C, D]``."""
        def make() -> torch.Tensor:
            tf = self.raw_text_features()
            return tf / tf.norm(dim=-1, keepdim=True)
        return self.frozen_text(make)

    def forward_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return clip_adapter_logits(self.adapter, upcast(feats), self.text_feats, self.ratio, self.logit_scale)

