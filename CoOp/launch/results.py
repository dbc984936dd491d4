"""Read finished sweep runs into flat rows: one per (method, setting, held-out domain, seed[, open set]).

Accuracy comes from the training records, detection metrics per score from the evaluation records, and the
source-domain validation accuracy (used to select a grid setting) from the evaluation runs' ``scores.npz``.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from dassl.engine.records import is_done, load_record
from dassl.evaluation.ood import fpr95_convention, metric_value
from launch.sweep import COOP_DIR, read_manifests



class Run(NamedTuple):
    method: str
    setting: str
    domain: str
    seed: int
    ood: str  # "" for training runs
    out_dir: str
    record: dict


def finished(root: str, kind: str) -> list[Run]:
    """Finished runs of the sweep manifests under ``root`` (``kind`` "train" or "eval"), in planned order."""
    runs, seen = [], set()
    for job in read_manifests(root):
        lab = job["labels"]
        out = job["output_dir"] if os.path.isabs(job["output_dir"]) else os.path.join(COOP_DIR, job["output_dir"])
        if lab.get("kind") != kind or out in seen or not is_done(out):
            continue
        seen.add(out)
        runs.append(Run(lab["method"], lab.get("setting", ""), lab["domain"], int(lab["seed"]), lab.get("ood", ""),
                        out, load_record(out)))
    return runs


def scores_file(out_dir: str, keys: Optional[Sequence[str]] = None) -> Optional[dict[str, np.ndarray]]:
    """The arrays an evaluation run saved (``scores.npz``; ``keys``: only those of them it holds, the others are
    not read), or None."""
    path = os.path.join(out_dir, "scores.npz")
    if not os.path.isfile(path):
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files if keys is None or k in keys}


def val_accuracy(run: Run) -> Optional[float]:
    """Source-domain validation accuracy (%) of an evaluation run, from its saved logits."""
    arr = scores_file(run.out_dir, ("val__logits", "val__labels"))
    if arr is None or "val__logits" not in arr:
        return None
    return 100.0 * float((arr["val__logits"].argmax(1) == arr["val__labels"]).mean())


def rows(eval_root: str) -> list[dict[str, Any]]:
    """One dict per evaluation run: labels, held-out accuracy, val accuracy and FPR95/AUROC (%) per score the
    run computed (FPR95 in each score's official convention, :func:`dassl.evaluation.ood.fpr95_convention`)."""
    out = []
    for r in finished(eval_root, "eval"):
        m = r.record.get("metrics", {})
        row = {"method": r.method, "setting": r.setting, "domain": r.domain, "seed": r.seed, "ood": r.ood,
               "acc": float(m.get("test", {}).get("accuracy", np.nan)), "val_acc": val_accuracy(r), "dir": r.out_dir}
        for s, det in m.get("ood", {}).items():
            row[f"{s}_fpr95"], row[f"{s}_auroc"] = 100 * metric_value(det, fpr95_convention(s)), 100 * det["auroc"]
        out.append(row)
    return out
