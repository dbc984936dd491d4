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
