"""Setup-I energy distributions (the official ``bash test_energy.sh`` of the seed README), from evaluation runs.

``scripts/CRoFT/test_energy.sh`` evaluates each seed's 32-shot model on ImageNet (``test_id``) and
ImageNet-V2/-Sketch/-A/-R with ``TEST.OOD_ID_SPLIT test``, so every run's ``scores.npz`` keeps the energy
(``test__score_energy``: logsumexp of the logits, the detection score) of its test images, next to the energy of
the open set (``ood_test__score_energy``). This module reads those runs and writes, per trained model (one
setting and seed), into ``<root>/energy/<setting>/``:

* ``energy_seed<S>.npz``: one array per group, ``test_id`` (ID test images), ``imagenet_v2``, ``imagenet_s``,
  ``imagenet_a``, ``imagenet_r`` (closed-set OOD: ID classes only) and ``open_set`` (the held-out classes, from
  the ``test_id`` run; every run of a seed draws the same open set);
* ``energy_seed<S>.png``: their histograms (densities on shared bins), one figure per seed.

Nothing is recomputed: the arrays are the runs' saved scores. Runs are found by walking ``root`` (no manifest
needed) and grouped by the model they evaluated (``model_dir`` of the record).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np

from dassl.engine.records import RECORD_FILE, is_done, load_record
from dassl.utils.tools import atomic_write_bytes
from launch import figures, setup1
from launch.results import scores_file
from launch.sweep import COOP_DIR

OPEN_SET = "open_set"
GROUPS = (*setup1.TEST_SETS, OPEN_SET)
LABELS = {"test_id": "ID test (ImageNet, ID classes)", "imagenet_v2": "ImageNet-V2", "imagenet_s": "ImageNet-Sketch",
          "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R", OPEN_SET: f"open set ({setup1.OOD_LABEL})"}


def _abs(path: str) -> str:
    return path if not path or os.path.isabs(path) else os.path.join(COOP_DIR, path)


def model_name(model_dir: str) -> str:
    """The setting directory of a trained model: ``.../<setting>/seed<S>/shots<K>`` -> ``<setting>``."""
    parts = os.path.normpath(model_dir).split(os.sep)
    while len(parts) > 1 and (parts[-1].startswith("seed") or parts[-1].startswith("shots")):
        parts.pop()
    return parts[-1]


def _shots(model_dir: str) -> Optional[int]:
    return load_record(model_dir).get("shots") if is_done(model_dir) else None


def find_runs(root: str, trainer: str, shots: Optional[int]) -> dict[tuple[str, int], dict[str, str]]:
    """(model directory, seed) -> {test set: evaluation run directory} of the finished Setup-I evaluation runs of
    ``trainer`` under ``root`` whose model was trained with ``shots`` shots (None: any)."""
    found: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        if RECORD_FILE not in files or not is_done(dirpath):
            continue
        rec = load_record(dirpath)
        if rec.get("mode") != "eval" or rec.get("dataset") != setup1.EVAL_DATASET or rec.get("trainer") != trainer:
            continue
        model = _abs(rec.get("model_dir") or "")
        if shots is not None and _shots(model) != shots:
            continue
        found[(model, int(rec["seed"]))][rec["config"]["TEST_OOD"]] = dirpath
    return found


def model_energies(runs: dict[str, str]) -> dict[str, np.ndarray]:
    """{group: energies} of one model from its runs ({test set: run directory}); SystemExit (one line) when a run
    did not keep its test split's energies."""
    out: dict[str, np.ndarray] = {}
    for test_set in setup1.TEST_SETS:
        if test_set not in runs:
            continue
        arr = scores_file(runs[test_set]) or {}
        if "test__score_energy" not in arr:
            raise SystemExit(f"error: {runs[test_set]} kept no test-split energies (scores.npz has no "
                             f"test__score_energy): evaluate with TEST.OOD_ID_SPLIT test, as "
                             f"scripts/CRoFT/test_energy.sh does")
        out[test_set] = arr["test__score_energy"]
        if OPEN_SET not in out or test_set == "test_id":
            out[OPEN_SET] = arr["ood_test__score_energy"]
    return {g: out[g] for g in GROUPS if g in out}


def write_model(out_dir: str, seed: int, groups: dict[str, np.ndarray], title: str) -> list[str]:
    """``energy_seed<S>.npz`` and ``energy_seed<S>.png`` of one model into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **groups)
    npz = os.path.join(out_dir, f"energy_seed{seed}.npz")
    atomic_write_bytes(npz, buf.getvalue())
    png = figures.score_histograms({title: {LABELS[g]: v for g, v in groups.items()}},
                                   os.path.join(out_dir, f"energy_seed{seed}.png"),
                                   xlabel="energy = logsumexp(logits) (higher = more ID)")
    return [npz, png]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Setup-I energy distributions (arrays + one histogram per seed) from "
                                            "evaluation runs made with TEST.OOD_ID_SPLIT test")
    p.add_argument("--root", default="eval_energy", help="evaluation root (relative to CoOp/)")
    p.add_argument("--trainer", default="CRoFT")
    p.add_argument("--shots", type=int, default=32, help="shots of the evaluated models (default 32, as officially)")
    p.add_argument("--out", default="", help="output folder (default: <root>/energy)")
    args = p.parse_args(argv)
    root = _abs(args.root)
    out_root = _abs(args.out) if args.out else os.path.join(root, "energy")
    try:
        found = find_runs(root, args.trainer, args.shots)
        if not found:
            raise SystemExit(f"error: no finished {args.trainer} Setup-I evaluation run of a {args.shots}-shot model "
                             f"under {root}")
        for (model, seed), runs in sorted(found.items()):
            name = model_name(model)
            for path in write_model(os.path.join(out_root, name), seed, model_energies(runs),
                                    f"{args.trainer} {name}, seed {seed}, {args.shots} shots"):
                print(f"written: {path}")
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
