"""CLIP backbones for the trainers: open_clip architectures, weights only from local files.

See :func:`load_clip`. Names are typed as users know them (``RN50``, ``ViT-B/16``, ``ViT-B/32``, ``ViT-L/14``)
or name a JSON model config in ``clip_backbone/model_configs`` (small CLIPs for tests and the demo).
"""
from .loader import (CLIPBundle, TextEncoder, available_backbones, default_weights_path, load_clip,
                     tokenize)
from .local import LOCAL_MODES, LocalFeatureEncoder

__all__ = ["CLIPBundle", "LOCAL_MODES", "LocalFeatureEncoder", "TextEncoder", "available_backbones",
           "default_weights_path", "load_clip", "tokenize"]
