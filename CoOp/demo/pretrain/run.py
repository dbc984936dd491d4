"""``pretrain()``: train the tiny CLIP with a :class:`Recipe` (or reuse the cached checkpoint of that recipe)."""
from __future__ import annotations

import hashlib
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from dassl.utils.tools import atomic_write_json
from demo.data import CLASSNAMES
from demo.pretrain import digits, model as tiny
from demo.pretrain.train import TRAIN_TEMPLATES, Recipe, deterministic_torch, stroke_alpha, train_steps
from demo.pretrain.zeroshot import digits_built, evaluate_zero_shot


def data_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over the training arrays (shape, dtype and bytes)."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(images), np.ascontiguousarray(labels, dtype=np.int64)):
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cpu_kernels() -> dict:
    """The CPU and the float kernels torch used (other instruction sets give other bytes)."""
    import os
    import platform

    model = next((ln.split(":", 1)[1].strip() for ln in _read_lines("/proc/cpuinfo") if ln.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", ""),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError:
        return []


def reusable(cache_dir: Path, cfg: dict, recipe: Recipe, digest: Optional[str]) -> Optional[dict]:
    """The cached summary when it was trained with this config, recipe and (if given) data."""
    cached = tiny.cached_summary(cache_dir, cfg)
    if cached is None or cached.get("recipe") != recipe.as_dict() or cached.get("source") == "shipped":
        return None  # a copy of the shipped weights is no pretraining of this machine
    if digest is not None and cached.get("data_sha256") != digest:
        return None
    return cached


def summarise(cfg: dict, recipe: Recipe, losses: list[float], data_info: dict, disjoint: dict, model: Any) -> dict:
    tail = losses[-min(10, len(losses)):]
    return {
        "model": tiny.MODEL_NAME, "model_config": cfg,
        "config_file": f"CoOp/clip_backbone/model_configs/{tiny.MODEL_NAME}.json",
        "tokenizer": f"open_clip.tokenizer.SimpleTokenizer(context_length={cfg['text_cfg']['context_length']})",
        "preprocess": {"image_size": int(cfg["vision_cfg"]["image_size"]), "mean": list(tiny.PIXEL_MEAN),
                       "std": list(tiny.PIXEL_STD), "input": "RGB in [0,1], then (x - mean) / std"},
        "recipe": recipe.as_dict(),
        "training": {
            "schedule": "linear warm-up, then cosine over the fixed number of steps",
            "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6)",
            "augmentation": (f"random +-{recipe.max_shift} px shift; with p={recipe.colour_aug} random flat stroke "
                             "and background colours (else white on black)"),
            "loss": "symmetric InfoNCE, same-class pairs positive (uniform target over them)",
            "determinism": "fixed steps, seeded generator, fixed torch threads, torch deterministic algorithms",
            "vocabulary": "only the token ids of the captions are trained; the other embedding rows are 0",
            "precision": "trained in float32; every floating tensor rounded to float16 after the last step "
                         "(stored as float16, run as float32)",
            "first_loss": round(losses[0], 4) if losses else None,
            "final_loss": round(float(np.mean(tail)), 4) if tail else None,
            "final_logit_scale": round(float(model.logit_scale.exp().item()), 2),
            "templates": TRAIN_TEMPLATES, "classnames": CLASSNAMES,
        },
        "data": data_info, "disjointness": disjoint,
        "versions": {"torch": torch.__version__, "open_clip_torch": _version("open_clip_torch"), "numpy": np.__version__},
        "losses": [round(v, 4) for v in losses],
    }


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def training_data(images: Optional[np.ndarray], labels: Optional[np.ndarray], npm_dir: Path,
                  data_root: Optional[Path]) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """(images, labels, provenance, disjointness check); the npm digits unless arrays are passed."""
    if images is None:
        images, labels, info = digits.load_pretrain_digits(npm_dir)
    else:
        info = {"images": "arrays passed by the caller", "n_used": int(len(images))}
    grey = images if images.ndim == 3 else images[..., 0]
    disjoint = digits.check_disjoint(grey, data_root) if data_root is not None else {"checked": False}
    if disjoint.get("pixel_identical_overlap"):
        raise RuntimeError(f"pretraining images overlap DigitsDG-mini: {disjoint}")
    return images, np.asarray(labels, dtype=np.int64), info, disjoint


def pretrain(cache_dir: str | Path = tiny.DEFAULT_CACHE_DIR, *, config_path: str | Path = tiny.CONFIG_PATH,
             data_root: Optional[str | Path] = tiny.DEFAULT_DATA_ROOT, npm_dir: str | Path = tiny.DEFAULT_NPM_DIR,
             force: bool = False, evaluate: bool = True, images: Optional[np.ndarray] = None,
             labels: Optional[np.ndarray] = None, verbose: bool = True, **recipe: Any) -> dict:
    """Train (or reuse) the tiny CLIP; returns the summary also written as ``tinyclip-rn32.json``.

    ``recipe`` keys are the fields of :class:`Recipe` (steps, batch_size, lr, seed, threads, ...);
    ``images``/``labels`` (uint8 (N, 32, 32[, 3]), labels 0..9) replace the npm digits (tests).
    """
    log: Callable = print if verbose else (lambda *a, **k: None)
    r, cache_dir, cfg = Recipe(**recipe), Path(cache_dir), tiny.load_model_config(config_path)
    digest = data_digest(images, labels) if images is not None else None
    cached = None if force else reusable(cache_dir, cfg, r, digest)
    if cached is not None:
        log(f"[reuse] {cache_dir / tiny.CKPT_NAME} (sha256 {cached['sha256']}); --force retrains")
        return {**cached, "reused": True}
    t0 = time.time()
    images, labels, info, disjoint = training_data(images, labels, Path(npm_dir),
                                                   Path(data_root) if data_root is not None else None)
    with deterministic_torch(r.threads):
        torch.manual_seed(r.seed)
        model = tiny.build_model(cfg)
        tokens = tiny.get_tokenizer(cfg)([t.format(c) for c in CLASSNAMES for t in TRAIN_TEMPLATES])
        log(f"pretraining {tiny.MODEL_NAME}: {len(images)} images, {r.steps} steps of {r.batch_size}, "
            f"{r.threads} threads, seed {r.seed}")
        losses = train_steps(model, tokens, stroke_alpha(images), torch.from_numpy(labels), r, log)
    model.eval()
    tiny.round_weights(model)
    summary = summarise(cfg, r, losses, info, disjoint, model)
    summary["data_sha256"] = digest or data_digest(images, labels)
    summary["made_on"] = cpu_kernels()
    summary["sha256"] = tiny.save_weights(model, cache_dir / tiny.WEIGHTS_NAME)
    summary["pt_sha256"] = tiny.write_state_dict(cache_dir / tiny.CKPT_NAME, model.state_dict())
    summary["seconds"] = round(time.time() - t0, 1)
    if evaluate and digits_built(data_root):
        summary["zero_shot"] = evaluate_zero_shot(model, tiny.get_tokenizer(cfg), data_root, verbose=verbose)
    atomic_write_json(str(cache_dir / tiny.META_NAME), summary)
    log(f"saved {cache_dir / tiny.CKPT_NAME} ({r.steps} steps, {summary['seconds']:.1f} s, "
        f"final loss {summary['training']['final_loss']}) sha256 {summary['sha256']}")
    return {**summary, "reused": False}
