"""TEST.KNN_ID_CORRECT_ONLY: the KNN detection's ID side is every held-out image by default (official KNN script),
only the correctly classified ones when the key is True; the energy side keeps TEST.OOD_ID_CORRECT_ONLY."""
from __future__ import annotations

import numpy as np
import pytest

from dassl.config import get_cfg_default
from dassl.engine.ood_eval import run_evaluation


class _Outputs:
    """A trainer whose evaluation outputs are fixed arrays (what ``run_evaluation`` reads from a trainer)."""

    def __init__(self, cfg, tmp_path):
        rng = np.random.default_rng(0)
        self.cfg = cfg
        cfg.OUTPUT_DIR = str(tmp_path)
        labels = np.arange(12) % 3
        logits = rng.normal(size=(12, 3))
        logits[np.arange(8), labels[:8]] += 5.0  # 8 correct, 4 most likely wrong
        self.split = {
            "test": {"logits": logits, "labels": labels, "features": rng.normal(size=(12, 4)),
                     "energy": np.log(np.exp(logits).sum(1))},
            "val": {"logits": rng.normal(size=(6, 3)), "labels": np.arange(6) % 3, "features": rng.normal(size=(6, 4))},
            "ood_test": {"logits": rng.normal(size=(9, 3)), "labels": -np.ones(9, int),
                         "features": rng.normal(size=(9, 4))},
        }
        for o in self.split.values():
            o["energy"] = np.log(np.exp(o["logits"]).sum(1))
        self.val_loader = self.ood_test_loader = object()

    def test(self, split="test"):
        return {"accuracy": 0.0}

    def collect_outputs(self, split):
        return {k: v.copy() for k, v in self.split[split].items()}

    def logit_scale_value(self):
        return 1.0


@pytest.mark.parametrize("knn_correct", [False, True])
def test_knn_id_side(tmp_path, knn_correct):
    cfg = get_cfg_default()
    cfg.TEST.OOD_SCORES = ("energy", "knn")
    cfg.TEST.KNN_K = 2
    cfg.TEST.SAVE_SCORES = False
    cfg.TEST.KNN_ID_CORRECT_ONLY = knn_correct
    tr = _Outputs(cfg, tmp_path)
    det = run_evaluation(tr)["ood"]
    t = tr.split["test"]
    correct = t["logits"].argmax(1) == t["labels"]
    assert 0 < correct.sum() < len(correct)
    assert det["energy"]["num_id"] == correct.sum() and det["energy"]["id_correct_only"] is True
    assert det["knn"]["num_id"] == (correct.sum() if knn_correct else len(correct))
    assert det["knn"]["id_correct_only"] is knn_correct
    assert cfg.TEST.KNN_ID_CORRECT_ONLY is knn_correct


def test_official_default_is_all_images():
    assert get_cfg_default().TEST.KNN_ID_CORRECT_ONLY is False
    assert get_cfg_default().TEST.OOD_ID_CORRECT_ONLY is True
