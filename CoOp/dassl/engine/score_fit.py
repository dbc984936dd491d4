"""Fitted OOD scores in an evaluation run: statistics from the ID training split, once per model.

A score registered with ``fit=`` (:mod:`dassl.evaluation.scores`; e.g. ``mahalanobis``, ``vim``, ``residual``,
``temp_msp``) needs statistics of the ID training split. When ``TEST.OOD_SCORES`` asks for one, the evaluator
runs the model once over the dataset's ``train_x`` (test transform, in order, through the feature cache when it
is installed; counted in the record's ``encoder_images``; the random state is left as it was), fits every
requested fitted score on it and keeps the statistics in a :class:`FittedStats` for every open set the model is
evaluated against (``train.py --eval-open-set`` fits once). Evaluation splits are never fitted on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..evaluation.scores import ScoreInputs, fit_needs, fit_score
from ..utils.errors import ConfigError, UserError
from ..utils.tools import rng_state, set_rng_state

DIM_KEYS = {"vim": "VIM_DIM", "residual": "RESIDUAL_DIM"}  # subspace sizes (TEST.<key>), < the feature dim


@dataclass
class FittedStats:
    """One model's fitted-score statistics: ``stats`` (score -> fit), ``skipped`` (score -> why it cannot be
    fitted) and the number of training-split ``images`` they come from."""

    stats: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    images: int = 0

    def record(self, name: str) -> dict[str, Any]:
        """What the run record says about score ``name``'s fit."""
        summary = getattr(self.stats[name], "summary", None)
        return {"split": "train", "images": self.images, **(summary() if callable(summary) else {})}


def check_dims(cfg: Any, names: list[str], feature_dim: int) -> None:
    """``TEST.VIM_DIM`` / ``TEST.RESIDUAL_DIM`` of the requested scores below the feature dimension, else one
    :class:`ConfigError` line naming the key."""
    for name in names:
        key = DIM_KEYS.get(name)
        if key is not None and not cfg.TEST[key] < feature_dim:
            raise ConfigError(f"TEST.{key} {cfg.TEST[key]} must be smaller than the feature dimension {feature_dim} "
                              f"of this model's image features ({name}: the principal dimensions kept, the rest is "
                              f"the residual; OpenOOD's default suits 2048-D ResNet-50 features)")


def training_split(trainer: Any) -> dict[str, np.ndarray] | None:
    """The model's outputs on the training split (None when the dataset has none); the random state is kept."""
    ds = getattr(getattr(trainer, "dm", None), "dataset", None)
    if not getattr(ds, "train_x", None):
        return None
    state = rng_state()
    try:
        return trainer.collect_outputs("train")
    finally:
        set_rng_state(state)


def fit_requested(trainer: Any, cfg: Any, names: list[str], id_inputs: ScoreInputs, cache: FittedStats,
                  make_inputs: Callable[[dict[str, np.ndarray]], ScoreInputs]) -> list[str]:
    """Fit the requested fitted scores ``cache`` lacks (one training pass); return ``names`` without those that
    cannot be fitted (a note each). ``make_inputs`` turns split outputs into :class:`ScoreInputs`."""
    todo = [n for n in names if fit_needs(n) and n not in cache.stats and n not in cache.skipped]
    if todo:
        if id_inputs.features is not None:
            check_dims(cfg, todo, int(id_inputs.features.shape[1]))
        out = training_split(trainer)
        train = None if out is None else make_inputs(out)
        if train is not None:
            train.labels = torch.from_numpy(np.asarray(out["labels"])).long()
            cache.images = int(len(out["labels"]))
        for name in todo:
            why = _cannot_fit(name, train)
            if why:
                cache.skipped[name] = why
                continue
            try:
                cache.stats[name] = fit_score(name, train)
            except ValueError as err:
                raise UserError(f"{name}: cannot fit its statistics on the training split: {err}") from None
            print(f"{name}: fitted on the training split ({cache.images} images): {cache.record(name)}")
    for name in [n for n in names if n in cache.skipped]:
        print(f"Note: {name} score skipped (fitted on the ID training split, but {cache.skipped[name]})")
    return [n for n in names if n not in cache.skipped]


def _cannot_fit(name: str, train: ScoreInputs | None) -> str:
    """Why score ``name`` cannot be fitted on the training split (empty: it can)."""
    if train is None:
        return "the dataset has no training split (train_x is empty; DATASET.NUM_SHOTS K >= 1 gives a K-shot one)"
    lacks = [f for f in fit_needs(name) if getattr(train, f) is None]
    return f"the model returns no {', '.join(lacks)} on the training split" if lacks else ""
