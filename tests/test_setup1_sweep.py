"""Setup-I end to end on a fake ImageNet tree: training sweep, evaluation sweep, both collectors."""
from __future__ import annotations

import json
import os

import pytest

from helpers import assert_ood_matches_scores
from synthetic_imagenet import write_imagenet_tree

OPTS = ["--", "MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DEVICE", "cpu",
        "DATASET.SETUP1_OOD_SIZE", "20"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from launch import setup1

    base = tmp_path_factory.mktemp("setup1")
    write_imagenet_tree(str(base / "data"))
    common = ["--root", str(base / "data"), "--seeds", "1", "--shots", "2", "--lambda1", "5", "--lambda2", "5",
              "--epochs", "1", "--output-root", str(base / "output"), "--eval-root", str(base / "eval"),
              "--launcher", "inprocess", "--test-sets", "test_id", "imagenet_a"]
    cwd = os.getcwd()
    try:
        for trainer in ("CRoFT", "ZeroshotCLIP"):
            assert setup1.main(common + OPTS, trainer=trainer) == 0
            assert setup1.main(common + OPTS, trainer=trainer, evaluate=True) == 0
    finally:
        os.chdir(cwd)
    return base


def test_setup1_runs_and_records(sweep):
    base = sweep
    train_dir = base / "output" / "CRoFT" / "imagenet46_ViT_ep30_l1-5_l2-5_r0.2_rt0.5_g1" / "seed1" / "shots2"
    rec = json.loads((train_dir / "record.json").read_text())
    assert rec["dataset"] == "ImageNet46" and rec["config"]["TRAINER"]["CRoFT"]["SEMANTICS"] == "auto"
    assert "CRoFT dataset semantics: setup1" in (train_dir / "log.txt").read_text()
    split = json.loads((train_dir / "class_split.json").read_text())
    assert split["seed"] == 1 and len(split["class_split"]) == 8 and len(split["id_wnids"]) == 8
    ev = (base / "eval" / "CRoFT" / "imagenetood46_ViT_ep30_l1-5_l2-5_r0.2_rt0.5_g1" / "shots2" / "imagenet_a" /
          "seed1" / "record.json")
    erec = json.loads(ev.read_text())
    assert erec["config"]["TEST_OOD"] == "imagenet_a" and erec["config"]["TEST"]["OOD_ID_SPLIT"] == "val"
    assert_ood_matches_scores(str(ev.parent), erec)


def test_setup1_collectors(sweep, capsys):
    from launch import collect

    base = sweep
    assert collect.main("oodg", ["--root", str(base / "eval")], setup=1) == 0
    out = capsys.readouterr().out
    assert "| method | setting | imagenet_a | test_id | Avg | seeds |" in out
    assert "| CRoFT | ViT_ep30_l1-5_l2-5_r0.2_rt0.5_g1_shots2 |" in out and "| ZeroshotCLIP | ViT_ep30_shots2 |" in out
    assert collect.main("oodd", ["--root", str(base / "eval")], setup=1) == 0
    out = capsys.readouterr().out
    assert "ImageNet-600 AUROC↑" in out and os.path.isfile(base / "eval" / "setup1_oodd.csv")


def test_setup1_official_grid_dry_run(capsys):
    from launch import setup1

    cwd = os.getcwd()
    try:
        assert setup1.main(["--root", "/nonexistent", "--dry-run"], trainer="CRoFT") == 0
        assert setup1.main(["--root", "/nonexistent", "--dry-run"], trainer="CoOp") == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "225 runs planned" in out and "9 runs planned" in out   # 3 seeds x 3 shots x 25 lambda pairs; 3 x 3
    assert "gen_step 10" in out   # 1 shot uses 10 generator steps
