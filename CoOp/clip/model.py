"""OpenAI CLIP's model layout over open_clip modules.

:class:`CLIP` exposes what CoOp-family code touches -- ``dtype``, ``token_embedding``, ``positional_embedding``,
``transformer`` (sequence-first input ``[L, N, D]``, causal mask built in), ``ln_final``, ``text_projection``,
``visual`` (with ``input_resolution``, ``output_dim``, ``conv1``, and ``proj`` for ViTs), ``logit_scale``,
``encode_image``, ``encode_text`` -- with OpenAI's state-dict keys, while the layers are open_clip's.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Transformer(nn.Module):
    """OpenAI's text transformer interface: ``forward(x)`` with ``x`` sequence-first ``[L, N, D]``; the causal
    attention mask is applied inside (open_clip's blocks are batch-first and take the mask as an argument)."""

    def __init__(self, inner: nn.Module, attn_mask: torch.Tensor) -> None:
        super().__init__()
        self.width = inner.width
        self.layers = inner.layers
        self.batch_first = bool(getattr(inner, "batch_first", True))
        self.resblocks = inner.resblocks
        self.register_buffer("attn_mask", attn_mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[0]
        mask = self.attn_mask[:length, :length].to(dtype=x.dtype, device=x.device)
        if self.batch_first:
            x = x.permute(1, 0, 2)
        for block in self.resblocks:
            x = block(x, attn_mask=mask)
        return x.permute(1, 0, 2) if self.batch_first else x


class CLIP(nn.Module):
    """An open_clip ``CLIP`` re-exposed with OpenAI's attributes and methods (its parameters are shared)."""

    def __init__(self, open_clip_model: nn.Module) -> None:
        super().__init__()
        oc = open_clip_model
        self.context_length = int(oc.context_length)
        self.vocab_size = int(oc.vocab_size)
        self.visual = oc.visual
        size = oc.visual.image_size
        self.visual.input_resolution = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.transformer = Transformer(oc.transformer, oc.attn_mask)
        self.token_embedding = oc.token_embedding
        self.positional_embedding = oc.positional_embedding
        self.ln_final = oc.ln_final
        self.text_projection = oc.text_projection
        self.logit_scale = oc.logit_scale

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image.type(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text).type(self.dtype)
        x = x + self.positional_embedding.type(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x).type(self.dtype)
        x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def convert_weights(model: nn.Module) -> None:
    """Cast the weights OpenAI keeps in fp16 to fp16 (conv/linear layers, attention projections,
    ``text_projection`` and ``proj``); embeddings, norms and ``logit_scale`` stay fp32, as in OpenAI's files."""

    def _convert(layer: nn.Module) -> None:
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            layer.weight.data = layer.weight.data.half()
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.half()
        if isinstance(layer, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                         "bias_k", "bias_v"):
                tensor = getattr(layer, name, None)
                if tensor is not None:
                    tensor.data = tensor.data.half()
        for name in ("text_projection", "proj"):
            attr = getattr(layer, name, None)
            if isinstance(attr, nn.Parameter):
                attr.data = attr.data.half()

    model.apply(_convert)
