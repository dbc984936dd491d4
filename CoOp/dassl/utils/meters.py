"""Running averages for the training progress line."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch


class AverageMeter:
    def __init__(self) -> None:
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        if isinstance(val, torch.Tensor):
            val = val.item()
        self.val = float(val)
        self.sum += self.val * n
        self.count += n
        self.avg = self.sum / self.count


class MetricMeter:
    """A dict of :class:`AverageMeter`, printed as ``name val (avg)``."""

    def __init__(self, delimiter: str = " ") -> None:
        self.meters: dict[str, AverageMeter] = defaultdict(AverageMeter)
        self.delimiter = delimiter

    def update(self, input_dict: dict[str, Any]) -> None:
        if not input_dict:
            return
        if not isinstance(input_dict, dict):
            raise TypeError("forward_backward() must return a dict of losses")
        for k, v in input_dict.items():
            if isinstance(v, (list, tuple)):
                continue
            self.meters[k].update(v)

    def __str__(self) -> str:
        return self.delimiter.join(f"{k} {m.val:.4f} ({m.avg:.4f})" for k, m in self.meters.items())
