"""Build a CLIP model from a local weights file (never a download) and a matching tokenizer.

``MODEL.BACKBONE.WEIGHTS`` may be:

* an OpenAI TorchScript archive (``ViT-B-16.pt`` as OpenAI's loader stores it),
* a plain state dict (OpenAI / open_clip key layout, optionally under ``state_dict`` with ``module.`` prefixes),
* an open_clip training checkpoint (``{"state_dict": ..., "epoch": ...}``),
* ``random``: an explicitly requested random initialisation (tests only; a warning is printed).

When it is empty, ``~/.cache/clip/<OpenAI file name>`` is used. OpenAI weights run with QuickGELU.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from dassl.utils.errors import ConfigError, WeightsError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")

# user-facing name -> (open_clip architecture, OpenAI cache file name)
OPENAI_NAMES = {
    "RN50": ("RN50", "RN50.pt"),
    "RN101": ("RN101", "RN101.pt"),
    "ViT-B/32": ("ViT-B-32", "ViT-B-32.pt"),
    "ViT-B/16": ("ViT-B-16", "ViT-B-16.pt"),
    "ViT-L/14": ("ViT-L-14", "ViT-L-14.pt"),
}
ALIASES = {"ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16", "ViT-L-14": "ViT-L/14"}


@dataclass
class CLIPBundle:
    """A loaded CLIP: the model (frozen by the caller), its context length and the weights' provenance."""

    model: nn.Module
    name: str
    context_length: int
    weights: str
    quick_gelu: bool

    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


def custom_configs() -> dict[str, str]:
    return {f[:-5]: os.path.join(CONFIG_DIR, f) for f in sorted(os.listdir(CONFIG_DIR)) if f.endswith(".json")}


def available_backbones() -> list[str]:
    return list(OPENAI_NAMES) + list(custom_configs())


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in OPENAI_NAMES and name not in custom_configs():
        import difflib

        close = difflib.get_close_matches(name, available_backbones(), n=3, cutoff=0.3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown MODEL.BACKBONE.NAME {name!r}{hint} (available: {', '.join(available_backbones())})")
    return name


def default_weights_path(name: str) -> str:
    """Where OpenAI's loader keeps a model (``~/.cache/clip/<file>``); custom configs: ``<name>.pt`` there."""
    name = canonical_name(name)
    fname = OPENAI_NAMES[name][1] if name in OPENAI_NAMES else f"{name}.pt"
    return os.path.join(os.path.expanduser("~/.cache/clip"), fname)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # OpenAI's files are TorchScript archives
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = dict(torch.jit.load(path, map_location="cpu").state_dict())
        except Exception:
            raise WeightsError(f"cannot read CLIP weights {path}: {err}") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path} holds no state dict")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def _build_custom(name: str, quick_gelu: Optional[bool]) -> tuple[nn.Module, int, bool]:
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    with open(custom_configs()[name], encoding="utf-8") as f:
        cfg = json.load(f)
    qg = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    vision = dict(cfg["vision_cfg"])
    if isinstance(vision.get("layers"), list):
        vision["layers"] = tuple(vision["layers"])
    model = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**vision),
                 text_cfg=CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=qg)
    del open_clip
    return model, int(cfg["text_cfg"].get("context_length", 77)), qg


def load_clip(name: str, weights: str = "", quick_gelu: Optional[bool] = None) -> CLIPBundle:
    """Build the CLIP ``name`` on CPU in fp32 and load ``weights`` (see module docstring).

    A missing weights file raises :class:`WeightsError` naming the path and what belongs there.
    """
    import open_clip

    name = canonical_name(name)
    path = weights or default_weights_path(name)
    is_random = weights.strip().lower() == "random"
    if not is_random and not os.path.isfile(path):
        what = (f"OpenAI's {OPENAI_NAMES[name][1]} (TorchScript or state dict)" if name in OPENAI_NAMES
                else f"a state dict for the '{name}' config")
        raise WeightsError(f"CLIP weights not found: {path} -- put {what} there or set MODEL.BACKBONE.WEIGHTS "
                           f"to a local file (nothing is downloaded)")
    if name in OPENAI_NAMES:
        arch = OPENAI_NAMES[name][0]
        qg = True if quick_gelu is None else quick_gelu
        model = open_clip.create_model(arch + ("-quickgelu" if qg else ""), pretrained=None)
        ctx = 77
    else:
        model, ctx, qg = _build_custom(name, quick_gelu)
    if is_random:
        print(f"WARNING: MODEL.BACKBONE.WEIGHTS=random -> randomly initialised {name} (for tests only)")
    else:
        sd = _read_state_dict(path)
        for k in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(k, None)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise WeightsError(f"{path} does not match backbone {name}: missing {list(missing)[:5]}, "
                               f"unexpected {list(unexpected)[:5]}")
    model = model.float().eval()
    return CLIPBundle(model=model, name=name, context_length=ctx, weights=path, quick_gelu=qg)


_TOKENIZERS: dict[int, Any] = {}


def tokenize(texts: list[str] | str, context_length: int = 77) -> torch.Tensor:
    """CLIP BPE token ids (``[n, context_length]``, int64), truncating over-long prompts."""
    from open_clip.tokenizer import SimpleTokenizer

    if context_length not in _TOKENIZERS:
        _TOKENIZERS[context_length] = SimpleTokenizer(context_length=context_length)
    return _TOKENIZERS[context_length]([texts] if isinstance(texts, str) else list(texts))


class TextEncoder(nn.Module):
    """CLIP's text transformer applied to token *embeddings* (what prompt learners feed it).

    ``forward(prompts, tokenized)``: ``prompts`` [n, L, width] token embeddings, ``tokenized`` [n, L] ids
    (the end-of-text position is the argmax id). Returns projected text features [n, embed_dim].
    """

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.positional_embedding.dtype

    def forward(self, prompts: torch.Tensor, tokenized: torch.Tensor) -> torch.Tensor:
        x = prompts + self.positional_embedding.to(prompts.dtype)
        mask = self.attn_mask.to(prompts.dtype) if self.attn_mask is not None else None
        if getattr(self.transformer, "batch_first", True):
            x = self.transformer(x, attn_mask=mask)
        else:
            x = self.transformer(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokenized.argmax(dim=-1)]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection
