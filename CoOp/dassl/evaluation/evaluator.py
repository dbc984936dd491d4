"""Closed-set evaluator (Dassl's ``Classification``: accuracy, error, macro-F1, the familiar result block)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..utils.registry import Registry

EVALUATOR_REGISTRY = Registry("EVALUATOR")


class EvaluatorBase:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, mo: torch.Tensor, gt: torch.Tensor) -> None:
        raise NotImplementedError

    def evaluate(self) -> "OrderedDict[str, float]":
        raise NotImplementedError


def macro_f1_score(y_true: list[int], y_pred: list[int]) -> float:
    """Macro F1 over the classes present in ``y_true`` (scikit-learn's ``f1_score(average="macro",
    labels=np.unique(y_true))``, 0 for a class never predicted correctly), from label counts: a class's F1 is
    2 TP / (2 TP + FP + FN). Counting with ``bincount`` keeps it cheap enough for every epoch's validation."""
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if t.size == 0:
        return 0.0
    if min(t.min(), p.min()) < 0:  # labels must index the counts
        
        return float(f1_score(t, p, average="macro", labels=np.unique(t)))
    n = int(max(t.max(), p.max())) + 1
    labels = np.unique(t)
    tp = np.bincount(t[t == p], minlength=n)[labels].astype(np.float64)
    denom = (np.bincount(t, minlength=n) + np.bincount(p, minlength=n))[labels].astype(np.float64)
    return float(np.mean(np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1.0), 0.0)))


@EVALUATOR_REGISTRY.register()
class Classification(EvaluatorBase):
    """Top-1 accuracy, error and macro-F1 in percent; prints ``=> result`` / ``* accuracy: xx.xx%``."""

    def __init__(self, cfg: Any, lab2cname: dict[int, str] | None = None, **kwargs: Any) -> None:
        super().__init__(cfg)
        self._lab2cname = lab2cname
        self.reset()

    def reset(self) -> None:
        self._correct = 0
        self._total = 0
        self._y_true: list[int] = []
        self._y_pred: list[int] = []

    def process(self, mo: torch.Tensor, gt: torch.Tensor) -> None:
        """``mo``: logits (N×C); ``gt``: labels (N)."""
        pred = mo.argmax(dim=1)
        matches = pred.eq(gt).float()
        self._correct += int(matches.sum().item())
        self._total += gt.shape[0]
        self._y_true.extend(gt.cpu().tolist())
        self._y_pred.extend(pred.cpu().tolist())

    def evaluate(self, verbose: bool = True) -> "OrderedDict[str, float]":
        total = max(self._total, 1)
        acc = 100.0 * self._correct / total
        err = 100.0 - acc
        macro_f1 = 100.0 * macro_f1_score(self._y_true, self._y_pred) if self._y_true else 0.0
        results = OrderedDict(accuracy=acc, error=err, macro_f1=float(macro_f1))
        if verbose:
            print("=> result")
            print(f"* total: {self._total:,}")
            print(f"* correct: {self._correct:,}")
            print(f"* accuracy: {acc:.2f}%")
            print(f"* error: {err:.2f}%")
            print(f"* macro_f1: {macro_f1:.2f}%")
        return results


def build_evaluator(cfg: Any, **kwargs: Any) -> EvaluatorBase:
    return EVALUATOR_REGISTRY.get(cfg.TEST.EVALUATOR)(cfg, **kwargs)
