"""Deterministic pretraining of the tiny CLIP: a fixed number of seeded steps on fixed torch threads.

The same arguments, package versions and machine kind give the same checkpoint bytes (the sha256 is recorded
and checked on reuse); the run never depends on wall-clock time.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from demo.data import CLASSNAMES
from demo.pretrain.model import normalise

TRAIN_TEMPLATES = [
    "a photo of the number {}.", "a handwritten {}.", "a photo of the digit {}.", "the digit {}.",
    "a picture of a handwritten {}.", "an image of the number {}.", "a scan of the digit {}.",
    "a drawing of the number {}.", "{}.",
]
EVAL_TEMPLATE = "a photo of the number {}."


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained bytes (besides data, package versions and the CPU kind)."""

    steps: int = 640
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 10
    max_shift: int = 2
    colour_aug: float = 0.5
    seed: int = 0
    threads: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed intra-op threads and deterministic algorithms for the block; the previous settings come back."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def clip_multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of (image, caption) pairs; same-class pairs are positives."""
    logits = logit_scale * img @ txt.t()
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)


def colourise(alpha: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Grey strokes alpha (N, 1, H, W) in [0, 1] -> RGB in [0, 1]: white on black, or with probability p
    a random flat foreground colour on a random flat background colour (either may be the lighter)."""
    n = alpha.shape[0]
    fg, bg = torch.ones(n, 3, 1, 1), torch.zeros(n, 3, 1, 1)
    pick = torch.rand(n, generator=g) < p
    k = int(pick.sum())
    if k:
        fg[pick] = torch.rand(k, 3, 1, 1, generator=g)
        bg[pick] = torch.rand(k, 3, 1, 1, generator=g)
    return bg * (1.0 - alpha) + fg * alpha


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift every image by its own random offset in [-max_shift, max_shift] px (zero fill)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=0.0)
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=g)
    return torch.stack([pad[i, :, int(dy):int(dy) + h, int(dx):int(dx) + w] for i, (dy, dx) in enumerate(off)])


def make_optimizer(model: torch.nn.Module, r: Recipe) -> torch.optim.Optimizer:
    """AdamW as open_clip trains CLIP: no decay on gains, biases, logit scale and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        flat = p.ndim < 2 or any(k in name for k in ("logit_scale", "token_embedding", "positional_embedding"))
        (no_decay if flat else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step: int, r: Recipe) -> float:
    """Linear warm-up, then cosine decay over the fixed number of steps."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    return r.lr * 0.5 * (1 + math.cos(math.pi * step / r.steps))


def batches(n: int, r: Recipe, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of a reshuffled permutation (a new one when the current one runs out)."""
    bs = min(r.batch_size, n)
    perm, pos = torch.randperm(n, generator=g), 0
    while True:
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos:pos + bs]
        pos += bs


@contextlib.contextmanager
def caption_vocabulary(model: torch.nn.Module, tokens: torch.Tensor) -> Iterator[torch.Tensor]:
    """Within the block the model embeds only the token ids the captions use (a small table, so the optimiser
    touches a few rows, not 49,408); yields the captions in those compact ids. The id order is kept, so the
    end-of-text token stays the largest id of every caption (open_clip pools at ``argmax``). On exit the full
    table comes back holding the trained rows and zeros elsewhere: a word the captions never use embeds to 0."""
    used = torch.unique(tokens)
    full = model.token_embedding
    small = torch.nn.Embedding(len(used), full.embedding_dim)
    with torch.no_grad():
        small.weight.copy_(full.weight[used])
    model.token_embedding = small
    try:
        yield torch.searchsorted(used, tokens)
    finally:
        with torch.no_grad():
            full.weight.zero_()
            full.weight[used] = small.weight
        model.token_embedding = full


def train_steps(model: torch.nn.Module, tokens: torch.Tensor, x_all: torch.Tensor, y_all: torch.Tensor,
                r: Recipe, log: Callable, log_every: int = 20) -> list[float]:
    """Run ``r.steps`` optimisation steps; ``tokens`` holds one caption per (class, template), class-major."""
    with caption_vocabulary(model, tokens) as compact:
        return _train_steps(model, compact, x_all, y_all, r, log, log_every)


def _train_steps(model: torch.nn.Module, tokens: torch.Tensor, x_all: torch.Tensor, y_all: torch.Tensor,
                 r: Recipe, log: Callable, log_every: int) -> list[float]:
    n_t, g = len(tokens) // len(CLASSNAMES), torch.Generator().manual_seed(r.seed)
    opt, losses = make_optimizer(model, r), []
    model.train()
    for step, idx in zip(range(r.steps), batches(len(x_all), r, g)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, r)
        xb, yb = colourise(random_shift(x_all[idx], g, r.max_shift), g, r.colour_aug), y_all[idx]
        cap = yb * n_t + torch.randint(0, n_t, (len(idx),), generator=g)
        uniq, inv = torch.unique(cap, return_inverse=True)
        img = model.encode_image(normalise(xb), normalize=True)
        loss = clip_multi_positive_loss(img, model.encode_text(tokens[uniq], normalize=True)[inv], yb,
                                        model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.item()))
        if (step + 1) % log_every == 0 or step == 0:
            log(f"  step {step + 1:4d}  loss {losses[-1]:.4f}  lr {lr_at(step, r):.2e}  "
                f"scale {model.logit_scale.exp().item():5.1f}")
    return losses


def stroke_alpha(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) -> grey stroke alpha (N, 1, H, W) in [0, 1]."""
    grey = images if images.ndim == 3 else images.mean(axis=-1).round().astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(grey)).float().div_(255.0).unsqueeze(1)
