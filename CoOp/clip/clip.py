"""OpenAI CLIP's loading API over open_clip, from local files only.

``_MODELS`` maps OpenAI's model names to URLs whose file names are where OpenAI's loader keeps the weights;
:func:`_download` only resolves ``<root>/<file name>`` (default ``~/.cache/clip``) and never downloads: a
missing file is a one-line :class:`~dassl.utils.errors.WeightsError` naming the path.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Optional, Union

import torch

from dassl.utils.errors import ConfigError, WeightsError

from .model import CLIP, convert_weights
from .simple_tokenizer import SimpleTokenizer

__all__ = ["available_models", "load", "tokenize", "build_model"]

_URL = "https://openaipublic.azureedge.net/clip/models/"
_MODELS = {
    "RN50": _URL + "RN50.pt",
    "RN101": _URL + "RN101.pt",
    "RN50x4": _URL + "RN50x4.pt",
    "RN50x16": _URL + "RN50x16.pt",
    "RN50x64": _URL + "RN50x64.pt",
    "ViT-B/32": _URL + "ViT-B-32.pt",
    "ViT-B/16": _URL + "ViT-B-16.pt",
    "ViT-L/14": _URL + "ViT-L-14.pt",
    "ViT-L/14@336px": _URL + "ViT-L-14-336px.pt",
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def available_models() -> list[str]:
    """Names accepted by :func:`load` (besides a path to a weights file)."""
    return list(_MODELS)


def _download(url: str, root: Optional[str] = None) -> str:
    """The local file for ``url``: ``<root>/<basename(url)>`` (root ``~/.cache/clip``). Nothing is downloaded."""
    root = os.path.expanduser(root or "~/.cache/clip")
    path = os.path.join(root, os.path.basename(url))
    if not os.path.isfile(path):
        raise WeightsError(f"CLIP weights not found: {path} -- put OpenAI's {os.path.basename(url)} (TorchScript "
                           f"archive or state dict) there; nothing is downloaded")
    return path


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """State dict of an OpenAI TorchScript archive (``torch.jit.load`` only) or of a plain
    (``state_dict``-wrapped) state dict file read weights-only; anything else is a one-line error naming it."""
    from clip_backbone.loader import _read_state_dict

    return _read_state_dict(path)


def build_model(state_dict: dict) -> CLIP:
    """A CLIP from an OpenAI-layout state dict (architecture read off the shapes, as OpenAI's
    ``build_model``), in OpenAI's mixed fp16 layout (see :func:`clip.model.convert_weights`); ``.float()``
    gives fp32. The caller's dict is not modified."""
    from open_clip.model import build_model_from_openai_state_dict

    try:
        oc = build_model_from_openai_state_dict(dict(state_dict), quick_gelu=True, cast_dtype=torch.float16)
    except (KeyError, RuntimeError, AssertionError) as err:
        raise WeightsError(f"state dict is not an OpenAI CLIP checkpoint: {str(err).splitlines()[0]}") from None
    model = CLIP(oc)
    convert_weights(model)
    return model.eval()


def _convert_rgb(image: Any) -> Any:
    return image.convert("RGB")


def _transform(n_px: int) -> Any:
    from torchvision import transforms as T

    return T.Compose([T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(n_px),
                      _convert_rgb, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def load(name: str, device: Union[str, torch.device] = "cuda" if torch.cuda.is_available() else "cpu",
         jit: bool = False, download_root: Optional[str] = None) -> tuple[CLIP, Any]:
    """``(model, preprocess)`` for an OpenAI model name, a weights file, or a config of ``clip_backbone``
    (tiny test/demo CLIPs, weights ``~/.cache/clip/<name>.pt``). On CPU the model is fp32, as OpenAI's.
    ``jit`` is accepted for API compatibility; the model is always the eager one."""
    if name in _MODELS:
        model = build_model(_read_weights(_download(_MODELS[name], download_root)))
    elif os.path.isfile(name):
        model = build_model(_read_weights(name))
    else:
        from clip_backbone import load_clip
        from clip_backbone.loader import custom_configs

        if name not in custom_configs():
            raise ConfigError(f"CLIP model {name!r} not found; available models: {available_models()} "
                              f"or a weights file")
        model = CLIP(load_clip(name).model)
    if jit:
        print("Note: clip.load(jit=True) returns the eager open_clip-backed model")
    model = model.to(device)
    if str(device) == "cpu":
        model = model.float()
    return model.eval(), _transform(model.visual.input_resolution)


@lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts: Union[str, list[str]], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Token ids ``[len(texts), context_length]`` (int32, zero-padded), ``<|startoftext|> ... <|endoftext|>``.

    A text longer than ``context_length`` tokens raises ``RuntimeError`` unless ``truncate`` (then the last
    kept token is ``<|endoftext|>``), as OpenAI's.
    """
    tok = _tokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.int)
    for i, text in enumerate(texts):
        tokens = [sot] + tok.encode(text) + [eot]
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, :len(tokens)] = torch.tensor(tokens)
    return result
