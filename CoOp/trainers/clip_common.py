"""What every CLIP trainer shares: backbone loading from the config, prompts and text features."""
from __future__ import annotations

import copy
import os
from typing import Any, Callable

import torch
import torch.nn as nn

import torch.nn.functional as F

from clip_backbone import CLIPBundle, LocalFeatureEncoder, default_weights_path, load_clip, tokenize
from dassl.engine import TrainerX
from dassl.utils import resources
from dassl.utils.errors import ConfigError
from dassl.engine.inference import InferenceOutput

from .prompt_templates import CUSTOM_TEMPLATES, DEFAULT_TEMPLATE, IMAGENET_TEMPLATES_SELECT
from .prompting import upcast


def load_clip_to_cpu(cfg: Any) -> CLIPBundle:
    """Build the configured CLIP (``MODEL.BACKBONE.NAME``/``WEIGHTS``) on CPU in fp32."""
    if not cfg.MODEL.BACKBONE.NAME:
        raise ConfigError("MODEL.BACKBONE.NAME is empty (e.g. RN50, ViT-B/16)")
    name, weights = cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.WEIGHTS
    if not resources.enabled():
        return load_clip(name, weights)
    random_weights = weights.strip().lower() == "random"
    path = weights if random_weights else (weights or default_weights_path(name))
    if not random_weights and not os.path.isfile(path):
        return load_clip(name, weights)  # its one-line error names the path
    st = None if random_weights else os.stat(path)
    ident = ("random",) if st is None else (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    # a sweep worker builds each CLIP once (per seed's random state: see resources.memo_rng); jobs get copies
    return resources.memo_rng(("clip", name, ident), lambda: load_clip(name, weights), copy.deepcopy,
                              per_state=random_weights)


def setup_frozen_clip(trainer: Any, prec: str) -> tuple[CLIPBundle, str]:
    """Load the configured CLIP, freeze it and put it on the trainer's device (image tower in fp16/bf16 when
    asked for; CPU forces fp32). Sets ``trainer.clip_model``, ``image_encoder`` and ``logit_scale``."""
    cfg = trainer.cfg
    print(f"Loading CLIP (backbone: {cfg.MODEL.BACKBONE.NAME})")
    bundle = load_clip_to_cpu(cfg)
    clip_model = freeze(bundle.model).to(trainer.device)
    prec = trainer.resolve_precision(prec)
    if prec in ("fp16", "bf16"):
        clip_model.visual.to(torch.float16 if prec == "fp16" else torch.bfloat16)
    trainer.clip_model = clip_model
    trainer.image_encoder = clip_model.visual
    trainer.logit_scale = bundle.logit_scale
    attach_local_encoder(trainer)
    return bundle, prec


def attach_local_encoder(trainer: Any) -> None:
    """Set ``trainer.local_image_encoder`` over its frozen ``image_encoder`` when the run wants local features
    (``trainer.wants_local``; ``MODEL.BACKBONE.LOCAL_FEATURES`` picks the definition)."""
    if getattr(trainer, "wants_local", False):
        trainer.local_image_encoder = LocalFeatureEncoder(trainer.image_encoder,
                                                          trainer.cfg.MODEL.BACKBONE.LOCAL_FEATURES)


def region_logits(local: torch.Tensor, text_feats: torch.Tensor, scale: float) -> torch.Tensor:
    """``(N, R, C)`` logits ``s * n(local) @ text_feats^T`` of local features ``(N, R, D)`` against normalised
    class text features ``(C, D)``, upcast to fp32 (as the global logits)."""
    local = upcast(local)
    return scale * (local / local.norm(dim=-1, keepdim=True)) @ upcast(text_feats).to(local.dtype).t()


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def single_template(cfg: Any) -> str:
    """The dataset's single prompt template (``DATASET.PROMPT_TEMPLATE`` overrides the built-in table)."""
    tpl = cfg.DATASET.PROMPT_TEMPLATE or CUSTOM_TEMPLATES.get(cfg.DATASET.NAME, DEFAULT_TEMPLATE)
    if "{}" not in tpl:
        raise ConfigError(f"prompt template {tpl!r} has no '{{}}' placeholder for the class name")
    return tpl


def class_prompts(classnames: list[str], template: str) -> list[str]:
    return [template.format(c.replace("_", " ")) for c in classnames]


@torch.no_grad()
def encode_prompts(bundle: CLIPBundle, prompts: list[str], device: torch.device, batch: int = 256) -> torch.Tensor:
    """Raw (unnormalised) CLIP text features of ``prompts`` (upcast to fp32; a float64 model gives float64)."""
    model = bundle.model
    out = []
    for i in range(0, len(prompts), batch):
        tokens = tokenize(prompts[i:i + batch], bundle.context_length).to(device)
        out.append(upcast(model.encode_text(tokens)))
    return torch.cat(out)


@torch.no_grad()
def text_features(bundle: CLIPBundle, classnames: list[str], mode: str, template: str,
                  device: torch.device) -> torch.Tensor:
    """Class text features.

    ``single``: raw ``encode_text`` of one template (not normalised, as the official single-template path);
    ``ensemble7``: the 7 templates, each L2-normalised, averaged and re-normalised (official ImageNet path);
    ``ensemble7+custom``: the 7 templates plus the single template (``ZeroshotCLIP2``).
    """
    if mode == "single":
        return encode_prompts(bundle, class_prompts(classnames, template), device)
    if mode not in ("ensemble7", "ensemble7+custom"):
        raise ConfigError(f"unknown text prompt mode {mode!r} (single, ensemble7, ensemble7+custom)")
    templates = list(IMAGENET_TEMPLATES_SELECT) + ([template] if mode == "ensemble7+custom" else [])
    feats = []
    for tpl in templates:
        f = encode_prompts(bundle, class_prompts(classnames, tpl), device)
        feats.append(f / f.norm(dim=-1, keepdim=True))
    mean = torch.stack(feats).mean(0)
    return mean / mean.norm(dim=-1, keepdim=True)


class FeatureHeadTrainer(TrainerX):
    """A trainable head on frozen image features, trained with cross-entropy (CLIP-Adapter, Tip-Adapter-F).

    Subclasses implement ``forward_features(feats) -> (logits, normalised features)`` and may override
    ``before_step`` (called before every training step and inference, e.g. to build a cache lazily).
    Frozen text classifiers go through :meth:`frozen_text`.
    """

    def frozen_text(self, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()`` (text features of the frozen CLIP), computed on first use and again whenever the text
        tower's dtype or device changes: the values of recomputing them on every forward (as the official
        CLIP-Adapter does) at the cost of one computation."""
        weight = self.clip_model.token_embedding.weight
        key = (weight.dtype, weight.device)
        if getattr(self, "_frozen_text_key", None) != key:
            self._frozen_text, self._frozen_text_key = make(), key
        return self._frozen_text

    def before_step(self) -> None:
        pass

    def forward_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        self.before_step()
        image, label = self.parse_batch_train(batch)
        logits, _ = self.forward_features(self.encode_images(image, batch))
        loss = F.cross_entropy(logits, label)
        self.model_backward_and_update(loss)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return {"loss": loss.item(), "acc": (logits.argmax(1) == label).float().mean().item() * 100.0}

    def model_inference(self, input: torch.Tensor) -> InferenceOutput:
        self.before_step()
        logits, feats = self.forward_features(self.encode_images(input))
        return InferenceOutput(logits=logits, features=feats)
