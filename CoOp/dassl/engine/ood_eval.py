"""Evaluation entry point of ``train.py --eval-only`` (every trainer): closed-set accuracy + open-set detection.

1. Closed-set accuracy on ``TEST.SPLIT`` (the held-out domain in Setup-II): the ``* accuracy:`` block.
2. If the dataset has an ``ood_test`` split (``PACS_DTD`` and friends): every score in ``TEST.OOD_SCORES``
   (``energy``, ``mcm``, ``msp``, ``knn``) on the ID side (``TEST.OOD_ID_SPLIT``, correctly classified images
   only when ``TEST.OOD_ID_CORRECT_ONLY``; for ``knn`` only when ``TEST.KNN_ID_CORRECT_ONLY``, default all
   images as the official KNN script) against the open-set images; all metrics of
   :func:`dassl.evaluation.ood.ood_metrics`; the familiar ``OODD_FPR95:`` / ``AUROC:`` lines for the energy score.
   KNN uses the source-domain ``val`` features as its bank (as the official KNN script). Fitted scores
   (``mahalanobis``, ``vim``, ``residual``, ``temp_msp``) get their statistics from one extra pass over the ID
   training split ``train_x`` (:mod:`.score_fit`), only when one is requested.
3. ``scores.npz`` (logits, labels, features, scores per split; ``local_<score>``: a local score's per-image
   reduction of the local logits, made per batch at collection, :func:`.inference.local_reduction`) and
   ``energy_hist.png`` in the output directory.
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch

from ..evaluation import ood
from ..evaluation.scores import ScoreInputs, compute_score, missing_inputs, score_names
from ..evaluation.plots import plot_score_histograms
from ..utils.errors import ConfigError
from ..utils.tools import atomic_write_bytes
from .inference import score_settings
from .score_fit import FittedStats, fit_requested


def _score_inputs(out: dict[str, np.ndarray], trainer: Any, bank: np.ndarray | None, k: int,
                  cfg: Any) -> ScoreInputs:
    """The registry's view of one split's outputs (float64, as the official numpy evaluation; the local scores'
    reductions were computed per batch in float32, as GL-MCM's own evaluation, and widen exactly)."""
    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.asarray(a)).double()

    return ScoreInputs(logits=t(out["logits"]), features=t(out.get("features")), bank=t(bank),
                       score=t(out.get("score")), k=k, **score_settings(trainer, cfg),
                       extras={key[len("extra_"):]: t(v) for key, v in out.items() if key.startswith("extra_")},
                       local={key[len("local_"):]: t(v) for key, v in out.items() if key.startswith("local_")})


def check_score_names(names: Any) -> list[str]:
    """``TEST.OOD_SCORES`` as a list; an unknown name is a one-line :class:`ConfigError`."""
    names = list(names)
    unknown = [n for n in names if n not in score_names()]
    if unknown:
        raise ConfigError(f"TEST.OOD_SCORES: unknown score(s) {unknown}; registered: {score_names()}")
    return names


def id_keep_mask(logits: np.ndarray, labels: np.ndarray, only_correct: bool) -> np.ndarray:
    """Which ID images count in detection: the correctly classified ones when ``only_correct`` (official
    evaluator), else all; all, with a warning, when none is correct. The one ID filter of runs and KNN sweeps."""
    keep = np.ones(len(labels), dtype=bool)
    if only_correct:
        keep = np.asarray(logits).argmax(1) == np.asarray(labels)
        if not keep.any():
            print("WARNING: no correctly classified ID image; using all ID images for detection")
            keep[:] = True
    return keep


def run_evaluation(trainer: Any) -> dict[str, Any]:
    """Evaluate a loaded trainer; return the metrics dict stored in the run record."""
    cfg = trainer.cfg
    metrics: dict[str, Any] = {"test": dict(trainer.test(split=cfg.TEST.SPLIT))}
    if trainer.ood_test_loader is None:
        return metrics
    id_split = cfg.TEST.OOD_ID_SPLIT
    outs = {id_split: trainer.collect_outputs(id_split), "ood_test": trainer.collect_outputs("ood_test")}
    if trainer.val_loader is not None and "val" not in outs:
        outs["val"] = trainer.collect_outputs("val")
    metrics.update(detect_open_set(trainer, outs))
    return metrics


def detect_open_set(trainer: Any, outs: dict[str, dict[str, np.ndarray]], cfg: Any = None,
                    id_scores: dict[tuple[str, str], np.ndarray] | None = None,
                    fitted: FittedStats | None = None) -> dict[str, Any]:
    """Every ``TEST.OOD_SCORES`` entry and its detection metrics from one run's split outputs (``outs``: the ID
    split, ``ood_test`` and ``val`` when present, in collection order); writes the artifacts to
    ``cfg.OUTPUT_DIR`` (``cfg``: the run's config, default ``trainer.cfg``). ``id_scores`` (score, split) ->
    scores of the splits other than ``ood_test``: filled on first use and reused, so a pass over several open
    sets scores the ID side once. ``fitted``: the model's fitted-score statistics (:mod:`.score_fit`), likewise
    fitted on the training split on first use and reused."""
    cfg = trainer.cfg if cfg is None else cfg
    id_split = cfg.TEST.OOD_ID_SPLIT
    id_out = outs[id_split]
    names = check_score_names(cfg.TEST.OOD_SCORES)
    has_feats = all("features" in o for o in outs.values()) and "val" in outs
    bank = outs["val"]["features"] if has_feats else None
    k = min(cfg.TEST.KNN_K, len(bank)) if bank is not None else 0
    if bank is not None and k < cfg.TEST.KNN_K:
        print(f"Note: KNN bank has {len(bank)} images < TEST.KNN_K={cfg.TEST.KNN_K}; using k={k}")
    inputs = {split: _score_inputs(o, trainer, bank, k, cfg) for split, o in outs.items()}
    for name in list(names):
        missing = sorted({m for inp in inputs.values() for m in missing_inputs(name, inp)})
        if missing:
            print(f"Note: {name} score skipped (this run has no {', '.join(missing)}: the trainer returns no "
                  f"image features or there is no val split)")
            names.remove(name)
    fits = FittedStats() if fitted is None else fitted
    names = fit_requested(trainer, cfg, names, inputs[id_split], fits,
                          lambda o: _score_inputs(o, trainer, None, 0, cfg))
    for inp in inputs.values():
        inp.fitted = fits.stats
    cache = {} if id_scores is None else id_scores
    detection: dict[str, Any] = {}
    all_scores: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        per_split = {}
        for split, inp in inputs.items():
            if split == "ood_test":
                per_split[split] = compute_score(name, inp)
            else:
                if (name, split) not in cache:
                    cache[(name, split)] = compute_score(name, inp)
                per_split[split] = cache[(name, split)]
        all_scores[name] = per_split
        only_correct = bool(cfg.TEST.KNN_ID_CORRECT_ONLY if name == "knn" else cfg.TEST.OOD_ID_CORRECT_ONLY)
        keep = id_keep_mask(id_out["logits"], id_out["labels"], only_correct)
        id_side = per_split[id_split][keep]
        threshold = ood.id_threshold_tpr95(id_side)
        res = ood.ood_metrics(id_side, per_split["ood_test"], threshold=threshold)
        res["num_id"] = int(keep.sum())
        res["id_correct_only"] = only_correct
        res["num_ood"] = int(len(per_split["ood_test"]))
        if name == "knn":
            res["k"] = k
        if name in fits.stats:
            res["fit"] = fits.record(name)
        detection[name] = res
        print(f"=> ood detection result (score: {name}; ID: {'correct ' if only_correct else 'all '}"
              f"{id_split} images, n={res['num_id']}; open-set n={res['num_ood']})")
        print(f"threshold @ TPR95 on ID: {threshold:.6f}")
        if name == "energy":
            print(f"OODD_FPR95: {res['fpr95_id_percentile']}")
            print(f"AUROC: {res['auroc']}")
        print(f"  {name}: FPR95(TPR-ID) {100 * res['fpr95_tpr_id']:.2f}  FPR95(ID-p5) "
              f"{100 * res['fpr95_id_percentile']:.2f}  FPR95(TPR-OOD) {100 * res['fpr95_tpr_ood']:.2f}  "
              f"AUROC {100 * res['auroc']:.2f}  AUPR-In {100 * res['aupr_in']:.2f}  AUPR-Out {100 * res['aupr_out']:.2f}")
    metrics: dict[str, Any] = {"ood": detection}
    if cfg.TEST.SAVE_SCORES:
        _save_artifacts(cfg, outs, all_scores, id_split)
        metrics["artifacts"] = {"scores": "scores.npz"}
        if "energy" in all_scores and cfg.TEST.SAVE_PLOTS:
            metrics["artifacts"]["energy_plot"] = "energy_hist.png"
    return metrics


def _save_artifacts(cfg: Any, outs: dict[str, dict[str, np.ndarray]],
                    all_scores: dict[str, dict[str, np.ndarray]], id_split: str) -> None:
    out_dir = cfg.OUTPUT_DIR
    arrays: dict[str, np.ndarray] = {}
    for split, o in outs.items():
        for key, val in o.items():
            arrays[f"{split}__{key}"] = val
    for name, per_split in all_scores.items():
        for split, val in per_split.items():
            arrays[f"{split}__score_{name}"] = val
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(os.path.join(out_dir, "scores.npz"), buf.getvalue())
    if "energy" in all_scores and cfg.TEST.SAVE_PLOTS:
        labels = {"val": "ID (source-domain val)", "test": "closed-set OOD (held-out domain)" if id_split == "test"
                  else "ID test", "ood_test": f"open-set OOD ({cfg.DATASET.NAME})"}
        plot_score_histograms({labels[s]: v for s, v in all_scores["energy"].items()},
                              os.path.join(out_dir, "energy_hist.png"),
                              title=f"{cfg.TRAINER.NAME} on {cfg.DATASET.NAME}")
