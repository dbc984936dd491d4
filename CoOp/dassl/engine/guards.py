"""Non-finite guard: a NaN/Inf loss term, gradient, weight or evaluation logit stops the run.

The training loop calls :func:`check_train_step` after every batch, before anything of that epoch is saved, so
the newest checkpoint on disk is always the last good one; ``train.py`` turns :class:`NonFiniteError` into one
line on stderr and exit code :data:`EXIT_NONFINITE` without writing ``record.json`` or ``done``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

EXIT_NONFINITE = 3
MAX_NAMED = 4


class NonFiniteError(RuntimeError):
    """Training or evaluation produced NaN/Inf values; the run must not be marked done."""

    exit_code = EXIT_NONFINITE


def _is_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isfinite(float(value))
    return True


def nonfinite_terms(summary: Mapping[str, Any]) -> list[str]:
    """Names of the loss-summary entries that are NaN or infinite."""
    return [name for name, value in summary.items() if not _is_finite(value)]


def nonfinite_tensors(models: Mapping[str, nn.Module]) -> list[str]:
    """``grad of <model>.<param>`` / ``<model>.<param>`` for trainable tensors holding NaN or Inf."""
    bad = []
    for mname, model in models.items():
        if model is None:
            continue
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is not None and not _is_finite(p.grad):
                bad.append(f"grad of {mname}.{pname}")
            if not _is_finite(p):
                bad.append(f"{mname}.{pname}")
    return bad


def _names(items: Iterable[str]) -> str:
    items = list(items)
    more = f" (+{len(items) - MAX_NAMED} more)" if len(items) > MAX_NAMED else ""
    return ", ".join(items[:MAX_NAMED]) + more


def check_train_step(trainer: Any, summary: Mapping[str, Any]) -> None:
    """Raise :class:`NonFiniteError` naming epoch, batch and the non-finite terms of this training step."""
    bad = nonfinite_terms(summary) + nonfinite_tensors(getattr(trainer, "_models", {}))
    if bad:
        raise NonFiniteError(f"non-finite values in epoch {trainer.epoch + 1} batch {getattr(trainer, 'batch_idx', 0) + 1}: "
                             f"{_names(bad)} (lower OPTIM.LR?); stopped, last good checkpoint kept, not marked done")


def check_loss(trainer: Any, loss: torch.Tensor, name: str = "loss") -> None:
    """Before backward: a non-finite ``loss`` stops the run (same message as :func:`check_train_step`)."""
    if not _is_finite(loss):
        check_train_step(trainer, {name: float("nan")})


def check_logits(logits: torch.Tensor, split: str, batch_idx: int) -> None:
    """Evaluation: NaN/Inf logits would give a chance-level accuracy from argmax; refuse them instead."""
    if not _is_finite(logits):
        raise NonFiniteError(f"non-finite logits while evaluating the {split!r} split (batch {batch_idx + 1}); "
                             f"no result written")
