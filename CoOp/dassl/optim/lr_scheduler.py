"""Per-epoch LR schedules (cosine, single_step, multi_step, constant) with Dassl's warm-up options.

One closed-form scheduler class covers every combination: the LR of epoch ``e`` (``last_epoch = e - 1``) is

* during warm-up (``last_epoch < WARMUP_EPOCH``): ``WARMUP_CONS_LR`` (``constant``) or
  ``base_lr * last_epoch / WARMUP_EPOCH`` with ``WARMUP_MIN_LR`` at epoch 1 (``linear``);
* afterwards: the successor schedule evaluated at ``last_epoch - WARMUP_EPOCH`` (``WARMUP_RECOUNT``) or
  at ``last_epoch``. Cosine: ``base_lr * (1 + cos(pi * t / MAX_EPOCH)) / 2``.

For the CRoFT config (cosine, 30 epochs, 1 constant warm-up epoch at 1e-5) this gives 1e-5 in epoch 1 and
``0.001 * (1 + cos(pi * (e - 2) / 30))`` afterwards, the official sequence.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..utils.errors import ConfigError

AVAI_SCHEDS = ("single_step", "multi_step", "cosine", "constant")


class WarmupLR(LRScheduler):
    """Closed-form epoch schedule with optional warm-up; step once per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, max_epoch: int, stepsize: Any = (-1,),
                 gamma: float = 0.1, warmup_epoch: int = 0, warmup_type: str = "constant",
                 cons_lr: float = 1e-5, min_lr: float = 1e-5, recount: bool = True) -> None:
        self.kind = kind
        self.max_epoch = max_epoch
        self.stepsize = list(stepsize) if isinstance(stepsize, (list, tuple)) else [stepsize]
        self.gamma = gamma
        self.warmup_epoch = max(int(warmup_epoch), 0)
        self.warmup_type = warmup_type
        self.cons_lr = cons_lr
        self.min_lr = min_lr
        self.recount = recount
        super().__init__(optimizer)

    def _successor(self, base_lr: float, t: int) -> float:
        if self.kind == "cosine":
            return base_lr * (1 + math.cos(math.pi * t / self.max_epoch)) / 2
        if self.kind == "single_step":
            step = self.stepsize[0]
            return base_lr if step <= 0 else base_lr * self.gamma ** (t // step)
        if self.kind == "multi_step":
            return base_lr * self.gamma ** sum(1 for m in self.stepsize if t >= m)
        return base_lr

    def lr_at(self, last_epoch: int) -> list[float]:
        """LRs of all parameter groups when ``last_epoch`` scheduler steps have been taken."""
        out = []
        for base in self.base_lrs:
            if last_epoch < self.warmup_epoch:
                if self.warmup_type == "constant":
                    out.append(self.cons_lr)
                else:
                    out.append(self.min_lr if last_epoch == 0 else base * last_epoch / self.warmup_epoch)
            else:
                t = last_epoch - self.warmup_epoch if self.recount else last_epoch
                out.append(self._successor(base, t))
        return out

    def get_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)

    def _get_closed_form_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any) -> WarmupLR:
    """Build the scheduler described by ``cfg.OPTIM`` (``LR_SCHEDULER``, ``MAX_EPOCH``, ``WARMUP_*``)."""
    kind = optim_cfg.LR_SCHEDULER
    if kind not in AVAI_SCHEDS:
        raise ConfigError(f"unknown OPTIM.LR_SCHEDULER {kind!r} (available: {', '.join(AVAI_SCHEDS)})")
    if optim_cfg.WARMUP_EPOCH > 0 and optim_cfg.WARMUP_TYPE not in ("constant", "linear"):
        raise ConfigError(f"unknown OPTIM.WARMUP_TYPE {optim_cfg.WARMUP_TYPE!r} (constant or linear)")
    return WarmupLR(optimizer, kind, optim_cfg.MAX_EPOCH, optim_cfg.STEPSIZE, optim_cfg.GAMMA,
                    optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_TYPE, optim_cfg.WARMUP_CONS_LR,
                    optim_cfg.WARMUP_MIN_LR, optim_cfg.WARMUP_RECOUNT)
