"""Test helpers: fixture loading, in-process CLI runs, a trivial trainer for engine tests."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
COOP = os.path.join(REPO, "CoOp")
FIXTURE = os.path.join(TESTS, "fixtures", "croft_reference.npz")

TINY = ["MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DEVICE", "cpu", "VERBOSE", "True"]


def load_fixture() -> Any:
    path = FIXTURE if os.path.isfile(FIXTURE) else os.path.join(REPO, "..", "shared", "fixtures",
                                                                 "croft_reference.npz")
    return np.load(path)


def run_cli(args: list[str]) -> dict[str, Any]:
    """Run ``train.py`` in-process from ``CoOp/`` (relative config paths work as for users)."""
    import train

    cwd = os.getcwd()
    os.chdir(COOP)
    try:
        return train.main(args)
    finally:
        os.chdir(cwd)


def cli_args(root: str, out: str, trainer: str, dataset_cfg: str = "configs/datasets/PACS.yaml",
             config: str = "configs/trainers/CRoFT/rn50_ep30.yaml", extra: list[str] | None = None,
             seed: int = 1, flags: list[str] | None = None) -> list[str]:
    return (["--root", root, "--seed", str(seed), "--trainer", trainer, "--dataset-config-file", dataset_cfg,
             "--config-file", config, "--output-dir", out] + (flags or []) + TINY + ["TEST_ENV", "sketch"]
            + (extra or []))


def register_probe_trainer() -> type:
    """A trivial trainer (linear probe on frozen CLIP features) for engine tests; registered once."""
    from dassl.engine import TRAINER_REGISTRY, TrainerX
    from dassl.optim import build_lr_scheduler, build_optimizer
    from trainers.clip_common import freeze, load_clip_to_cpu

    if "TestProbe" in TRAINER_REGISTRY:
        return TRAINER_REGISTRY.get("TestProbe")

    class TestProbe(TrainerX):
        """Keeps the engine's default ``model_inference``: logits only (score: their energy)."""

        crash_at_epoch: int = -1

        def build_model(self) -> None:
            bundle = load_clip_to_cpu(self.cfg)
            self.image_encoder = freeze(bundle.model).visual.to(self.device)
            self.model = nn.Linear(bundle.embed_dim, self.num_classes).to(self.device)
            self.optim = build_optimizer(self.model, self.cfg.OPTIM)
            self.sched = build_lr_scheduler(self.optim, self.cfg.OPTIM)
            self.register_model("probe", self.model, self.optim, self.sched)

        def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
            if self.epoch == type(self).crash_at_epoch:
                raise KeyboardInterrupt("simulated kill")
            image, label = self.parse_batch_train(batch)
            logits = self.model(self.encode_images(image, batch))
            loss = nn.functional.cross_entropy(logits, label)
            self.model_backward_and_update(loss)
            if self.batch_idx + 1 == self.num_batches:
                self.update_lr()
            return {"loss": loss.item(), "acc": (logits.argmax(1) == label).float().mean().item() * 100}

    TRAINER_REGISTRY.register(TestProbe)
    return TestProbe


def assert_logged_accuracy(out_dir: str, rec: dict[str, Any]) -> None:
    """The record's test accuracy is 100 * correct / total of the run's last logged result block (total > 0)."""
    import re

    log = open(os.path.join(out_dir, "log.txt"), encoding="utf-8").read()
    blocks = re.findall(r"\* total: ([\d,]+)\n\* correct: ([\d,]+)\n", log)
    assert blocks, f"no result block in {out_dir}/log.txt"
    total, correct = (int(x.replace(",", "")) for x in blocks[-1])
    assert total > 0 and abs(rec["metrics"]["test"]["accuracy"] - 100.0 * correct / total) < 1e-9


def assert_ood_matches_scores(out_dir: str, rec: dict[str, Any], scores: tuple[str, ...] = ("energy",)) -> None:
    """Recompute accuracy and each score's AUROC (scikit-learn) and ID/OOD counts from the run's scores.npz."""
    from sklearn.metrics import roc_auc_score

    z = np.load(os.path.join(out_dir, "scores.npz"))
    test_cfg = rec["config"]["TEST"]
    id_split = test_cfg["OOD_ID_SPLIT"]
    logits, labels = z[f"{id_split}__logits"], z[f"{id_split}__labels"]
    correct = logits.argmax(1) == labels
    if id_split == test_cfg["SPLIT"]:
        assert abs(rec["metrics"]["test"]["accuracy"] - 100.0 * correct.mean()) < 1e-6
    for name in scores:
        det = rec["metrics"]["ood"][name]
        keep = correct if det["id_correct_only"] and correct.any() else np.ones(len(labels), dtype=bool)
        id_s, ood_s = z[f"{id_split}__score_{name}"][keep], z[f"ood_test__score_{name}"]
        assert det["num_id"] == len(id_s) > 0 and det["num_ood"] == len(ood_s) > 0
        truth = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
        assert abs(det["auroc"] - roc_auc_score(truth, np.r_[id_s, ood_s])) < 1e-9, name
