"""Local (per-region) image features of CLIP's image tower, next to the unchanged global feature.

:class:`LocalFeatureEncoder` wraps ``model.visual`` (open_clip's ``ModifiedResNet`` or ``VisionTransformer`` as
:func:`clip_backbone.load_clip` builds them) and returns ``(global (N, D), local (N, R, D))``. The global feature
comes from the tower's own forward pass (so it equals ``model.encode_image`` exactly); the local features are
computed from an intermediate tensor captured during that same pass (a hook, removed after the call):

* ResNet (``RN50``: R = 7 x 7 at 224 px): the input of the attention pool (the last stage's spatial map, no
  positional embedding), each position through the pool's value projection and its output projection
  ``c_proj(v_proj(x_hw))``, positions in row-major order. This is LoCoOp's and GL-MCM's definition.
* ViT, mode ``value`` (default; LoCoOp's and GL-MCM's definition): the last residual block run on its input ``x``
  with the attention replaced by the value path, ``v = x + out_proj(W_v ln_1(x) + b_v)``,
  ``v = v + mlp(ln_2(v))``, then ``ln_post`` and ``proj``; the class token is dropped (R = 14 x 14 for
  ViT-B/16 at 224 px).
* ViT, mode ``tokens`` (named deviation): the transformer's final patch tokens through ``ln_post`` and ``proj``.

Mode ``tokens`` does not exist for ResNets (a one-line error). Unsupported towers (attentional pooling,
``final_ln_after_pool``, pooling other than the class token) are refused at construction.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dassl.utils.errors import ConfigError

LOCAL_MODES = ("value", "tokens")


def _tower_kind(visual: nn.Module) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, VisionTransformer):
        return "vit"
    raise ConfigError(f"local image features: unsupported image tower {type(visual).__name__} "
                      f"(open_clip ModifiedResNet or VisionTransformer only)")


def _check_vit(visual: nn.Module) -> None:
    block = visual.transformer.resblocks[-1]
    reasons = [why for bad, why in (
        (getattr(visual, "attn_pool", None) is not None, "attentional pooling"),
        (bool(getattr(visual, "final_ln_after_pool", False)), "final_ln_after_pool"),
        (getattr(visual, "pool_type", "tok") != "tok", f"pool_type {getattr(visual, 'pool_type', '')!r}"),
        (visual.proj is None, "no output projection"),
        (not isinstance(getattr(block, "attn", None), nn.MultiheadAttention), "a custom attention block"),
        (hasattr(block, "ln_1_kv"), "separate key/value norms")) if bad]
    if reasons:
        raise ConfigError(f"local image features: this ViT has {', '.join(reasons)}; only CLIP's class-token "
                          f"ViT is supported")


class LocalFeatureEncoder:
    """``encoder(images) -> (global (N, D), local (N, R, D))`` for a CLIP image tower (module docstring)."""

    def __init__(self, visual: nn.Module, mode: str = "value") -> None:
        if mode not in LOCAL_MODES:
            raise ConfigError(f"MODEL.BACKBONE.LOCAL_FEATURES must be one of {LOCAL_MODES}, got {mode!r}")
        self.kind = _tower_kind(visual)
        if self.kind == "resnet" and mode != "value":
            raise ConfigError(f"MODEL.BACKBONE.LOCAL_FEATURES {mode!r} exists only for ViT towers; ResNets have "
                              f"one definition (use 'value')")
        if self.kind == "vit":
            _check_vit(visual)
        self.visual = visual
        self.mode = mode

    def _hook_target(self) -> tuple[nn.Module, bool]:
        """(module, pre): the module whose input (pre) or output is captured."""
        if self.kind == "resnet":
            return self.visual.attnpool, True
        if self.mode == "value":
            return self.visual.transformer.resblocks[-1], True
        return self.visual.transformer, False

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        box: dict[str, torch.Tensor] = {}
        module, pre = self._hook_target()
        if pre:
            handle = module.register_forward_pre_hook(lambda m, args: box.__setitem__("x", args[0]))
        else:
            handle = module.register_forward_hook(lambda m, args, out: box.__setitem__("x", out))
        try:
            pooled = self.visual(images)
        finally:
            handle.remove()
        return pooled, self.local_from(box["x"])

    def local_from(self, x: torch.Tensor) -> torch.Tensor:
        """Local features ``(N, R, D)`` from the captured tensor (see the module docstring)."""
        v = self.visual
        if self.kind == "resnet":
            tokens = x.flatten(2).transpose(1, 2)          # (N, C, H, W) -> (N, HW, C), row-major
            return v.attnpool.c_proj(v.attnpool.v_proj(tokens))
        if self.mode == "value":
            if not getattr(v.transformer, "batch_first", True):
                x = x.transpose(0, 1)                      # a block's input (L, N, W) -> (N, L, W)
            x = _value_path(v.transformer.resblocks[-1], x)
        return v.ln_post(x[:, 1:]) @ v.proj


def _value_path(block: Any, x: torch.Tensor) -> torch.Tensor:
    """A residual attention block with its attention replaced by the value path (each token attends to itself)."""
    attn = block.attn
    width = x.shape[-1]
    bias = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width:], bias)
    v = x + block.ls_1(attn.out_proj(v))
    return v + block.ls_2(block.mlp(block.ln_2(v)))
