"""The tiny CLIP ``tinyclip-rn32``: open_clip's ``CLIP`` from ``clip_backbone/model_configs``, its tokenizer,
input normalisation and the cached checkpoint contract (``<name>.pt`` + ``<name>.json`` holding its sha256)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dassl.utils.tools import sha256_file

MODEL_NAME = "tinyclip-rn32"
COOP_DIR = Path(__file__).resolve().parents[2]
REPO_DIR = COOP_DIR.parent
CONFIG_PATH = COOP_DIR / "clip_backbone" / "model_configs" / f"{MODEL_NAME}.json"
DEFAULT_CACHE_DIR = REPO_DIR / ".cache" / "tinyclip"
DEFAULT_DATA_ROOT = REPO_DIR / ".cache" / "data"
DEFAULT_NPM_DIR = REPO_DIR / ".cache" / "npm"
CKPT_NAME = f"{MODEL_NAME}.pt"
META_NAME = f"{MODEL_NAME}.json"

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


def cached_summary(cache_dir: str | Path, cfg: Optional[dict] = None) -> Optional[dict]:
    """The json summary of a valid cached checkpoint (sha256 and config match), else None."""
    ckpt, meta = Path(cache_dir) / CKPT_NAME, Path(cache_dir) / META_NAME
    if not (ckpt.is_file() and meta.is_file()):
        return None
    try:
        summary = json.loads(meta.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if summary.get("sha256") != sha256_file(str(ckpt)):
        return None
    if cfg is not None and summary.get("model_config") != cfg:
        return None
    return summary


def load_pretrained(cache_dir: str | Path = DEFAULT_CACHE_DIR, config_path: str | Path = CONFIG_PATH) -> tuple:
    """(model, tokenizer, cfg) of the cached checkpoint (strict load); raises FileNotFoundError if absent."""
    cfg = load_model_config(config_path)
    if cached_summary(cache_dir, cfg) is None:
        raise FileNotFoundError(f"no valid {CKPT_NAME} in {cache_dir}: run python -m demo.pretrain first")
    model = build_model(cfg)
    model.load_state_dict(torch.load(Path(cache_dir) / CKPT_NAME, map_location="cpu", weights_only=True), strict=True)
    return model.eval(), get_tokenizer(cfg), cfg
