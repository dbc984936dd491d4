"""Top-k accuracy as Dassl computes it (percent, one 1-element tensor per k)."""
from __future__ import annotations

from typing import Any, Sequence

import torch


def compute_accuracy(output: Any, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[torch.Tensor]:
    """Top-k accuracies in percent of ``output`` [N, C] (or a list/tuple whose first item is the logits).

    Returns ``[acc_k1, acc_k2, ...]``, each a tensor of shape [1] (``compute_accuracy(out, y)[0].item()``).
    """
    if isinstance(output, (tuple, list)):
        output = output[0]
    maxk = max(topk)
    n = target.size(0)
    pred = output.topk(maxk, dim=1, largest=True, sorted=True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True) * 100.0 / n for k in topk]
