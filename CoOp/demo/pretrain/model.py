"""The tiny CLIP ``tinyclip-rn32``: open_clip's ``CLIP`` from ``clip_backbone/model_configs``, its tokenizer,
input normalisation and the checkpoint contract: ``<name>.safetensors`` (the weights, float16 values: what is
shipped and what its sha256 names), ``<name>.json`` (recipe, provenance, zero-shot table, that sha256) and, in a
cache, ``<name>.pt`` (the same values as a float32 state dict for ``MODEL.BACKBONE.WEIGHTS``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dassl.utils.tools import atomic_write_bytes, sha256_file

MODEL_NAME = "tinyclip-rn32"
COOP_DIR = Path(__file__).resolve().parents[2]
REPO_DIR = COOP_DIR.parent
CONFIG_PATH = COOP_DIR / "clip_backbone" / "model_configs" / f"{MODEL_NAME}.json"
DEFAULT_CACHE_DIR = REPO_DIR / ".cache" / "tinyclip-pretrained"  # make demo installs the shipped copy in tinyclip/
DEFAULT_DATA_ROOT = REPO_DIR / ".cache" / "data"
DEFAULT_NPM_DIR = REPO_DIR / ".cache" / "npm"
CKPT_NAME = f"{MODEL_NAME}.pt"
META_NAME = f"{MODEL_NAME}.json"
WEIGHTS_NAME = f"{MODEL_NAME}.safetensors"
SHIP_DTYPE = torch.float16

PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def load_model_config(path: str | Path = CONFIG_PATH) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_model(cfg: dict) -> torch.nn.Module:
    """Build ``open_clip.model.CLIP`` from a model-config dict, as clip_backbone.loader does."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = dict(cfg["vision_cfg"])
    if isinstance(vision.get("layers"), list):
        vision["layers"] = tuple(vision["layers"])
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**vision),
                text_cfg=CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=bool(cfg.get("quick_gelu", False)))


def get_tokenizer(cfg: dict) -> Any:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=int(cfg["text_cfg"]["context_length"]))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (N, 3, H, W) -> OpenAI CLIP's (x - mean) / std."""
    return (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (N, H, W) -> normalised float tensor (N, 3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(-1).expand(-1, -1, -1, 3)
    return normalise(x.permute(0, 3, 1, 2).contiguous())


def round_weights(model: torch.nn.Module) -> None:
    """Round every floating parameter and buffer to ``SHIP_DTYPE`` precision, in place (kept as float32)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(SHIP_DTYPE).to(t.dtype))


def save_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Write the state dict as safetensors (floating tensors as ``SHIP_DTYPE``), atomically; returns its sha256."""
    from safetensors.torch import save

    sd = {k: (v.to(SHIP_DTYPE) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(str(path), save(sd))
    return sha256_file(str(path))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The safetensors state dict with floating tensors as float32."""
    from safetensors.torch import load_file

    return {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}


def write_state_dict(path: str | Path, sd: dict[str, torch.Tensor]) -> str:
    """torch.save ``sd`` atomically (the float32 copy trainers load); returns its sha256."""
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    atomic_write_bytes(str(path), buf.getvalue())
    return sha256_file(str(path))


def read_summary(folder: str | Path) -> Optional[dict]:
    """``<name>.json`` of ``folder`` when it names the sha256 of the ``<name>.safetensors`` beside it, else None."""
    weights, meta = Path(folder) / WEIGHTS_NAME, Path(folder) / META_NAME
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        summary = json.loads(meta.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return summary if summary.get("sha256") == sha256_file(str(weights)) else None


def cached_summary(cache_dir: str | Path, cfg: Optional[dict] = None) -> Optional[dict]:
    """The json summary of a valid cached checkpoint (the safetensors and the float32 ``.pt`` copy match their
    recorded sha256, the model config matches), else None."""
    summary = read_summary(cache_dir)
    ckpt = Path(cache_dir) / CKPT_NAME
    if summary is None or not ckpt.is_file() or summary.get("pt_sha256") != sha256_file(str(ckpt)):
        return None
    if cfg is not None and summary.get("model_config") != cfg:
        return None
    return summary


def load_pretrained(cache_dir: str | Path = DEFAULT_CACHE_DIR, config_path: str | Path = CONFIG_PATH) -> tuple:
    """(model, tokenizer, cfg) of the cached checkpoint (strict load); raises FileNotFoundError if absent."""
    cfg = load_model_config(config_path)
    if cached_summary(cache_dir, cfg) is None:
        raise FileNotFoundError(f"no valid {WEIGHTS_NAME} in {cache_dir}: run python -m demo.pretrain first")
    model = build_model(cfg)
    model.load_state_dict(read_weights(Path(cache_dir) / WEIGHTS_NAME), strict=True)
    return model.eval(), get_tokenizer(cfg), cfg
