"""OpenAI CLIP's API (``from clip import clip``; ``clip.load``, ``clip.tokenize`` ...) backed by open_clip.

Weights come only from local files (``~/.cache/clip/<file>`` as OpenAI's loader stores them, or a path);
nothing is ever downloaded. See :mod:`clip.clip`.
"""
from .clip import _MODELS, _download, available_models, build_model, load, tokenize  # noqa: F401

__all__ = ["available_models", "load", "tokenize", "build_model"]
