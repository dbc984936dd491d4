"""Build a CLIP model from a local weights file (never a download) and a matching tokenizer.

``MODEL.BACKBONE.WEIGHTS`` may be:

* an OpenAI TorchScript archive (``ViT-B-16.pt`` as OpenAI's loader stores it),
* a plain state dict (OpenAI / open_clip key layout, optionally under ``state_dict`` with ``module.`` prefixes),
* an open_clip training checkpoint (``{"state_dict": ..., "epoch": ...}``),
* ``random``: an explicitly requested random initialisation (tests only; a warning is printed).

When it is empty, ``~/.cache/clip/<OpenAI file name>`` is used. OpenAI weights run with QuickGELU.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from dassl.utils.errors import ConfigError, UserError, WeightsError
from dassl.utils.filecache import cached_sha256
from dassl.utils.safe_load import is_torchscript_archive, load_torch_file, load_torchscript_state_dict

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
    """The state dict in a weights file: OpenAI's TorchScript archive (read by ``torch.jit.load`` only) or a
    ``torch.save`` file read weights-only (:mod:`dassl.utils.safe_load`); anything else is a one-line error."""
    try:
        if is_torchscript_archive(path):
            obj = load_torchscript_state_dict(path)
        else:
            obj = load_torch_file(path, "CLIP weights")
    except UserError as err:
        raise WeightsError(str(err)) from None
    except Exception as err:
        raise WeightsError(f"cannot read CLIP weights {path}: {(str(err).splitlines() or [''])[0]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds no state dict (expected parameter names -> tensors)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


class _SkipNoPretrained(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning (root logger) while
    building an architecture whose weights are loaded right after."""
    flt = _SkipNoPretrained()
    logging.getLogger().addFilter(flt)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(flt)


# (kind, vision layers, width, patch, image size) of OpenAI's CLIPs, as read off a state dict
KNOWN_ARCHS = {
    ("ResNet", (3, 4, 6, 3), 64, None, 224): "RN50", ("ResNet", (3, 4, 23, 3), 64, None, 224): "RN101",
    ("ResNet", (4, 6, 10, 6), 80, None, 288): "RN50x4", ("ResNet", (6, 8, 18, 8), 96, None, 384): "RN50x16",
    ("ResNet", (3, 15, 36, 10), 128, None, 448): "RN50x64", ("ViT", 12, 768, 32, 224): "ViT-B/32",
    ("ViT", 12, 768, 16, 224): "ViT-B/16", ("ViT", 24, 1024, 14, 224): "ViT-L/14",
    ("ViT", 24, 1024, 14, 336): "ViT-L/14@336px",
}


def _config_arch(name: str) -> tuple:
    """The architecture tuple of a custom JSON config (see :data:`KNOWN_ARCHS`)."""
    with open(custom_configs()[name], encoding="utf-8") as f:
        v = json.load(f)["vision_cfg"]
    if isinstance(v["layers"], (list, tuple)):
        return ("ResNet", tuple(v["layers"]), v["width"], None, v["image_size"])
    return ("ViT", v["layers"], v["width"], v["patch_size"], v["image_size"])


def state_dict_arch(sd: dict[str, torch.Tensor]) -> Optional[tuple]:
    """The image tower of an OpenAI-layout CLIP state dict, read off its shapes as OpenAI's ``build_model``
    does; None when the keys are not CLIP's."""
    try:
        if "visual.proj" in sd:
            conv = sd["visual.conv1.weight"]
            layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            return ("ViT", layers, conv.shape[0], conv.shape[-1], conv.shape[-1] * grid)
        counts = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4))
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        return ("ResNet", counts, width, None, grid * 32)
    except (KeyError, IndexError, AttributeError):
        return None


def describe_arch(arch: Optional[tuple]) -> str:
    """``ViT-B/32`` for a known architecture, else its shape (``ViT: 1 layers, width 32, patch 8, 32 px``)."""
    if arch is None:
        return "non-CLIP (unrecognised keys)"
    known = {**KNOWN_ARCHS, **{_config_arch(n): n for n in custom_configs()}}
    if arch in known:
        return known[arch]
    kind, layers, width, patch, size = arch
    return f"{kind}: layers {layers}, width {width}" + (f", patch {patch}" if patch else "") + f", {size} px"


def _mismatch(path: str, found: str, name: str, detail: str = "") -> WeightsError:
    return WeightsError(f"CLIP weights {path} does not match backbone {name} (MODEL.BACKBONE.NAME): the file holds "
                        f"{found} weights{detail}; set MODEL.BACKBONE.NAME to the file's architecture or "
                        f"MODEL.BACKBONE.WEIGHTS to {name} weights")


def expected_arch(name: str) -> Optional[tuple]:
    """The architecture tuple of a backbone name (an OpenAI name or a custom config)."""
    if name in custom_configs():
        return _config_arch(name)
    return next((arch for arch, n in KNOWN_ARCHS.items() if n == name), None)


def check_arch_name(sd: dict[str, torch.Tensor], name: str, path: str) -> None:
    """Before building: weights of a recognised architecture other than ``name``'s are one line naming both."""
    arch, wanted = state_dict_arch(sd), expected_arch(name)
    known = set(KNOWN_ARCHS) | {_config_arch(n) for n in custom_configs()}
    if arch in known and wanted is not None and arch != wanted:
        raise _mismatch(path, describe_arch(arch), name)


def check_architecture(model: nn.Module, sd: dict[str, torch.Tensor], name: str, path: str) -> None:
    """After building: one line naming the file's architecture and the requested one when ``sd`` does not fit."""
    own = model.state_dict()
    bad = [k for k in sd if k in own and tuple(own[k].shape) != tuple(sd[k].shape)]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if not (bad or missing or unexpected):
        return
    detail = (f"{len(bad)} tensors of another shape, e.g. {bad[0]}" if bad else
              f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
    raise _mismatch(path, describe_arch(state_dict_arch(sd)), name, f" ({detail})")


def weights_provenance(name: str, weights: str = "") -> dict[str, Any]:
    """What a run records about its CLIP weights: the file (the default path when ``weights`` is empty), its
    size and sha256 (computed once per file version, :func:`dassl.utils.filecache.cached_sha256`)."""
    if weights.strip().lower() == "random":
        return {"backbone": name, "path": "random", "sha256": None}
    path = os.path.abspath(os.path.expanduser(weights or default_weights_path(name)))
    if not os.path.isfile(path):
        return {"backbone": name, "path": path, "sha256": None}
    return {"backbone": name, "path": path, "size": os.path.getsize(path), "sha256": cached_sha256(path)}


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
    sd = None if is_random else _read_state_dict(path)  # read first: a bad file fails before any build
    if sd is not None:
        check_arch_name(sd, name, path)
    if name in OPENAI_NAMES:
        arch = OPENAI_NAMES[name][0]
        qg = True if quick_gelu is None else quick_gelu
        with _quiet_open_clip():  # its "No pretrained weights loaded" warning: the weights are loaded below
            model = open_clip.create_model(arch + ("-quickgelu" if qg else ""), pretrained=None)
        ctx = 77
    else:
        model, ctx, qg = _build_custom(name, quick_gelu)
    if sd is None:
        print(f"WARNING: MODEL.BACKBONE.WEIGHTS=random -> randomly initialised {name} (for tests only)")
    else:
        for k in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(k, None)
        check_architecture(model, sd, name, path)
        model.load_state_dict(sd, strict=False)
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
