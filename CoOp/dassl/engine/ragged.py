"""Concatenation of per-batch logits whose widths differ (e.g. DPLCLIP's concatenated group logits)."""
from __future__ import annotations

from typing import Sequence

import torch


def cat_padded(rows: Sequence[torch.Tensor], value: float = float("-inf")) -> torch.Tensor:
    """Concatenate ``[N_i, C_i]`` tensors along dim 0, right-padding narrower ones to ``max C_i`` with ``value``.

    ``-inf`` (the default) leaves softmax, logsumexp (energy) and argmax of every row unchanged; zero padding would
    not (a zero column adds ``exp(0)`` to the energy and can win the argmax).
    """
    width = max(int(r.shape[1]) for r in rows)
    padded = [r if r.shape[1] == width else
              torch.cat([r, r.new_full((r.shape[0], width - r.shape[1]), value)], dim=1) for r in rows]
    return torch.cat(padded, dim=0)
