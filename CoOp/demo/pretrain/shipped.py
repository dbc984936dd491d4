"""The tiny CLIP's weights shipped in the repository (``CoOp/demo/weights/``): ``tinyclip-rn32.safetensors.gz``
(the safetensors file, float16 values, gzip-compressed: the unused rows of the word-embedding table are zeros)
and ``tinyclip-rn32.json`` (recipe, provenance, zero-shot table, the sha256 of the uncompressed safetensors).

``make demo`` installs them into its cache (the safetensors, and a float32 ``.pt`` for ``MODEL.BACKBONE.WEIGHTS``)
instead of pretraining, so every machine fine-tunes the same weights; ``python -m demo.pretrain --ship``
regenerates them with the default recipe (deterministic on one CPU model; docs/demo.md gives the sha256 per CPU
kernel set).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

from dassl.utils.tools import atomic_write_bytes, atomic_write_json
from demo.pretrain import model as tiny

SHIPPED_DIR = tiny.COOP_DIR / "demo" / "weights"
SHIPPED_NAME = f"{tiny.WEIGHTS_NAME}.gz"
CACHE_ONLY_KEYS = ("pt_sha256", "reused", "source")


def shipped_summary(shipped_dir: str | Path = SHIPPED_DIR) -> tuple[dict, bytes]:
    """(the shipped json, the uncompressed safetensors bytes), checked against each other; one clear error when
    either is missing or they differ."""
    gz, meta = Path(shipped_dir) / SHIPPED_NAME, Path(shipped_dir) / tiny.META_NAME
    fix = "restore both from git or regenerate them with python -m demo.pretrain --ship"
    try:
        raw = gzip.decompress(gz.read_bytes())
        summary = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, EOFError, ValueError) as e:
        raise FileNotFoundError(f"{gz} / {meta.name}: unreadable ({e}); {fix}") from None
    if summary.get("sha256") != hashlib.sha256(raw).hexdigest():
        raise FileNotFoundError(f"{gz}: its sha256 differs from {meta.name} beside it; {fix}")
    return summary, raw


def use_shipped(cache_dir: str | Path, shipped_dir: str | Path = SHIPPED_DIR) -> dict:
    """Install the shipped weights into ``cache_dir`` (safetensors + json, and the float32 ``.pt``) unless a
    valid copy of the same sha256 is there; returns the cache's summary (``reused`` says which)."""
    src, raw = shipped_summary(shipped_dir)
    cache_dir = Path(cache_dir)
    cached = tiny.cached_summary(cache_dir, src.get("model_config"))
    if cached is not None and cached["sha256"] == src["sha256"]:
        return {**cached, "reused": True}
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(str(cache_dir / tiny.WEIGHTS_NAME), raw)
    pt = tiny.write_state_dict(cache_dir / tiny.CKPT_NAME, tiny.read_weights(cache_dir / tiny.WEIGHTS_NAME))
    summary = {**src, "pt_sha256": pt, "source": "shipped"}
    atomic_write_json(str(cache_dir / tiny.META_NAME), summary)
    return {**summary, "reused": False}


def ship(cache_dir: str | Path, shipped_dir: str | Path = SHIPPED_DIR) -> dict:
    """Write the checkpoint of ``cache_dir`` to ``shipped_dir``: the safetensors gzip-compressed (no file name or
    time stamp inside, so the same weights give the same bytes) and the json without its cache-only keys."""
    summary = tiny.read_summary(cache_dir)
    if summary is None:
        raise FileNotFoundError(f"no valid {tiny.WEIGHTS_NAME} in {cache_dir}")
    Path(shipped_dir).mkdir(parents=True, exist_ok=True)
    raw = (Path(cache_dir) / tiny.WEIGHTS_NAME).read_bytes()
    atomic_write_bytes(str(Path(shipped_dir) / SHIPPED_NAME), gzip.compress(raw, compresslevel=9, mtime=0))
    out = {k: v for k, v in summary.items() if k not in CACHE_ONLY_KEYS}
    atomic_write_json(str(Path(shipped_dir) / tiny.META_NAME), out)
    for name in (SHIPPED_NAME, tiny.META_NAME):
        os.chmod(Path(shipped_dir) / name, 0o644)  # repository files, readable by all
    return out
