"""``LoCoOp`` trainer (Miyai et al., NeurIPS 2023): CoOp's prompt learner plus an OOD regulariser on local regions.

CoOp's learnable context (:class:`trainers.prompting.PromptLearner`, 16 generic tokens, class token at the end)
and frozen CLIP; each training image also gives its local features (:mod:`clip_backbone.local`, R regions) and
their logits ``s * cos(region, text_c)`` against the same prompts. The loss (:func:`locoop_loss`) is

    CE(global logits, y) - λ · H̄,   H̄ = mean over the selected regions of the entropy of softmax(region logits)

where a region is selected when the label is NOT among its top-K classes (the regions that look like background,
used as OOD features), the entropy is ``-Σ_c p log(p + 1e-5)`` and H̄ = 0 when no region is selected, as in the
authors' ``entropy_select_topk``. λ = ``TRAINER.LOCOOP.LAMBDA`` (official 0.25). K: ``TRAINER.LOCOOP.TOPK`` when
> 0, else ``round(TOPK_RATIO · C)`` (at least 1, at most C) for C classes; the default ratio 0.2 gives the official
K = 200 on ImageNet-1k and K = 1 (PACS, 7 classes; VLCS, 5), 2 (DigitsDG, 10) and 80 (ImageNet46, 400). An
absolute TOPK above C (the official 200 on PACS) is a one-line error.

Inference returns the global logits and the normalised image features, plus the local logits in the passes that
ask for them (``infer_local``: open-set detection splits with ``gl_mcm`` / ``l_mcm``); the per-epoch validation
and the final test compute no local features (only the training steps do). Precision as CoOp (``PREC`` fp16
official, ``FP32_PARAMS`` named fix); logits and the loss are fp32.
Checkpoint model name ``prompt_learner``; the token buffers are dropped on load as for CoOp.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dassl.config.validate import PREC, count, nonneg, unit
from dassl.engine import TRAINER_REGISTRY
from dassl.utils.errors import ConfigError

from .prompt_trainer import ContextPromptTrainer
from .prompting import upcast

ENTROPY_EPS = 1e-5  # inside the log, as the authors' code


def resolve_topk(topk: int, ratio: float, n_classes: int) -> int:
    """K of the top-K region selection: ``topk`` when > 0 (at most ``n_classes``), else ``round(ratio * C)``
    clamped to ``[1, C]`` (half rounds up)."""
    if int(topk) > 0:
        if int(topk) > n_classes:
            raise ConfigError(f"TRAINER.LOCOOP.TOPK={int(topk)} exceeds the {n_classes} classes of this dataset; "
                              f"set TRAINER.LOCOOP.TOPK 0 and TOPK_RATIO (0.2 = the official 200 of 1000)")
        return int(topk)
    if not ratio > 0:
        raise ConfigError("TRAINER.LOCOOP.TOPK is 0 and TOPK_RATIO is 0: set one of them (official: ratio 0.2)")
    return min(n_classes, max(1, int(ratio * n_classes + 0.5)))


def selected_region_entropy(local_logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mean entropy of the regions whose top-``top_k`` classes exclude the image's label (0 when none does).

    ``local_logits`` ``(N, R, C)``, ``labels`` ``(N,)``; entropy ``-Σ p log(p + 1e-5)`` of ``softmax`` over classes.
    """
    n, r, c = local_logits.shape
    p = F.softmax(local_logits.reshape(n * r, c), dim=-1)
    top = p.topk(top_k, dim=1).indices
    has_label = (top == labels.repeat_interleave(r).unsqueeze(1)).any(dim=1)
    chosen = p[~has_label]
    if chosen.shape[0] == 0:
        return p.new_zeros(())
    return -(chosen * torch.log(chosen + ENTROPY_EPS)).sum(dim=1).mean()


def locoop_loss(logits: torch.Tensor, local_logits: torch.Tensor, labels: torch.Tensor, lam: float,
                top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, loss_id, loss_en)``: ``loss_id = CE(logits, y)``, ``loss_en = -entropy`` of the selected regions,
    ``loss = loss_id + lam * loss_en``."""
    loss_id = F.cross_entropy(logits, labels)
    loss_en = -selected_region_entropy(local_logits, labels, top_k)
    return loss_id + lam * loss_en, loss_id, loss_en


@TRAINER_REGISTRY.register()
class LoCoOp(ContextPromptTrainer):
    """Local regularized Context Optimization: CoOp + entropy maximisation on non-top-K local regions."""

    cfg_node = "LOCOOP"
    TRAIN_LOCAL = True
    CFG_RANGES = {"TRAINER.LOCOOP.N_CTX": count(0, "ignored with CTX_INIT; >= 1 without it"),
                  "TRAINER.LOCOOP.PREC": PREC,
                  "TRAINER.LOCOOP.LAMBDA": nonneg("weight of the local entropy term"),
                  "TRAINER.LOCOOP.TOPK": count(0, "0: from TOPK_RATIO"),
                  "TRAINER.LOCOOP.TOPK_RATIO": unit("K = round(ratio x classes) when TOPK is 0")}

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        c = cfg.TRAINER.LOCOOP = ContextPromptTrainer.context_cfg()
        c.LAMBDA = 0.25        # weight of the entropy term (official --lambda_value 0.25)
        c.TOPK = 0             # absolute K (official --topk 200 on 1000 classes); 0: K from TOPK_RATIO
        c.TOPK_RATIO = 0.2     # K = round(ratio x classes) when TOPK is 0 (200 / 1000 = 0.2)

    def build_prompt_model(self, clip_model: nn.Module, classnames: list[str]) -> nn.Module:
        c = self.cfg.TRAINER.LOCOOP
        self.top_k = resolve_topk(c.TOPK, c.TOPK_RATIO, len(classnames))
        self.lam = float(c.LAMBDA)
        print(f"LoCoOp: lambda {self.lam}, top-K {self.top_k} of {len(classnames)} classes")
        return super().build_prompt_model(clip_model, classnames)

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        image, label = self.parse_batch_train(batch)
        with self.autocast():
            feats, raw, local = self.image_features_local(image, batch)
            logits, local_logits = (upcast(t) for t in self.forward_logits_local(feats, raw, local))
            loss, loss_id, loss_en = locoop_loss(logits, local_logits, label, self.lam, self.top_k)
        self.optimisation_step(loss)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return {"loss": loss.item(), "loss_id": loss_id.item(), "loss_en": loss_en.item(),
                "acc": (logits.argmax(1) == label).float().mean().item() * 100.0}
