"""Setup-I end to end on a fake ImageNet tree: training sweep, evaluation sweep, both collectors."""
from __future__ import annotations

import json
import os

import numpy as np
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
    rows = [line for line in out.splitlines() if line.startswith("| ")]  # method labels may carry a plan note
    assert any(r.startswith("| CRoFT") and "| ViT_ep30_l1-5_l2-5_r0.2_rt0.5_g1_shots2 |" in r for r in rows)
    assert any(r.startswith("| ZeroshotCLIP") and "| ViT_ep30_shots2 |" in r for r in rows)
    assert collect.main("oodd", ["--root", str(base / "eval")], setup=1) == 0
    out = capsys.readouterr().out
    assert "ImageNet-600 AUROC↑" in out and os.path.isfile(base / "eval" / "setup1_oodd.csv")


def test_setup1_collectors_read_the_test_set_of_runs_made_by_hand(sweep, tmp_path, capsys):
    """Evaluation runs outside any manifest (train.py by hand): the test set comes from the record (TEST_OOD), the
    shots from the evaluated model's record."""
    import shutil

    from launch import collect

    src = sweep / "eval" / "CRoFT" / "imagenetood46_ViT_ep30_l1-5_l2-5_r0.2_rt0.5_g1" / "shots2"
    acc = {}
    for test_set in ("test_id", "imagenet_a"):
        dst = tmp_path / "CRoFT" / "byhand" / test_set / "seed1"
        shutil.copytree(src / test_set / "seed1", dst)
        acc[test_set] = json.loads((dst / "record.json").read_text())["metrics"]["test"]["accuracy"]
    assert not (tmp_path / "sweeps").exists()  # no manifest
    assert collect.main("oodg", ["--root", str(tmp_path)], setup=1) == 0
    out = capsys.readouterr().out
    assert "| method | setting | imagenet_a | test_id | Avg | seeds |" in out  # one column per test set
    row = next(line for line in out.splitlines() if line.startswith("| CRoFT"))
    assert f"| byhand_shots2 | {acc['imagenet_a']:.2f} | {acc['test_id']:.2f} | {acc['imagenet_a']:.2f} | 1 |" in row
    # a record written before the rename of fpr95_val_threshold (and val_threshold) still collects
    path = tmp_path / "CRoFT" / "byhand" / "test_id" / "seed1" / "record.json"
    rec = json.loads(path.read_text())
    energy = rec["metrics"]["ood"]["energy"]
    energy["fpr95_val_threshold"] = energy.pop("fpr95_id_percentile")
    energy["val_threshold"] = energy.pop("id_threshold")
    path.write_text(json.dumps(rec))
    cell = f"| {100 * energy['fpr95_val_threshold']:.2f} | {100 * energy['auroc']:.2f} |"
    for fpr in ([], ["--fpr", "fpr95_val_threshold"], ["--fpr", "fpr95_id_percentile"]):
        assert collect.main("oodd", ["--root", str(tmp_path), *fpr], setup=1) == 0
        out = capsys.readouterr().out
        assert "No finished runs found" not in out and "ImageNet-600 AUROC↑" in out
        assert any(line.startswith("| CRoFT") and "| energy |" in line and cell in line for line in out.splitlines())


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


def test_energy_needs_runs_that_kept_the_test_energies(sweep, capsys):
    from launch import energy

    # the sweep's evaluation runs use the official ID side (val): their scores.npz have no test-split energies
    assert energy.main(["--root", str(sweep / "eval"), "--shots", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "TEST.OOD_ID_SPLIT test" in err and len(err.splitlines()) == 1
    assert energy.main(["--root", str(sweep / "eval"), "--shots", "32"]) == 2
    assert "no finished CRoFT Setup-I evaluation run of a 32-shot model" in capsys.readouterr().err


def test_eval_id_split_reaches_evaluation_runs_only():
    from launch import setup1

    argv = ["--root", "/nonexistent", "--seeds", "1", "--shots", "32", "--lambda1", "5", "--lambda2", "5"]
    cwd = os.getcwd()
    try:
        ev = setup1.plan(argv + ["--eval-id-split", "test"], trainer="CRoFT", evaluate=True)[1]
        official = setup1.plan(argv, trainer="CRoFT", evaluate=True)[1]
    finally:
        os.chdir(cwd)
    assert len(ev) == 5 and all(j.argv[j.argv.index("TEST.OOD_ID_SPLIT") + 1] == "test" for j in ev)
    assert all("TEST.OOD_ID_SPLIT" not in j.argv for j in official)  # official: the dataset config's val
    assert {j.labels["train_dir"] for j in ev} == {j.labels["train_dir"] for j in official}  # the same models


@pytest.mark.slow
def test_energy_script_writes_arrays_and_one_figure_per_seed(sweep):
    """scripts/CRoFT/test_energy.sh (the seed README's `bash test_energy.sh`) on the trained 2-shot model."""
    import subprocess
    import sys

    from scipy.special import logsumexp

    from helpers import COOP

    base = sweep
    env = dict(os.environ, DATA=str(base / "data"), SHOTS="2", OUTPUT_ROOT=str(base / "output"),
               EVAL_ROOT=str(base / "energy"), PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    cmd = ["bash", os.path.join(COOP, "scripts", "CRoFT", "test_energy.sh"), "--seeds", "1", "--lambda1", "5",
           "--lambda2", "5", "--epochs", "1", "--launcher", "inprocess", *OPTS]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = base / "energy" / "energy" / "imagenet46_ViT_ep30_l1-5_l2-5_r0.2_rt0.5_g1"
    arrays = np.load(out / "energy_seed1.npz")
    assert sorted(arrays.files) == sorted(["test_id", "imagenet_v2", "imagenet_s", "imagenet_a", "imagenet_r",
                                           "open_set"])
    assert (out / "energy_seed1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # synthetic tree: 8 ID classes (40 % of 20) x 6 val images; SETUP1_OOD_SIZE 20 open-set images for seed 1
    assert len(arrays["test_id"]) == 48 and len(arrays["open_set"]) == 20
    runs = base / "energy" / "CRoFT" / "imagenetood46_ViT_ep30_l1-5_l2-5_r0.2_rt0.5_g1" / "shots2"
    for test_set in ("test_id", "imagenet_v2", "imagenet_s", "imagenet_a", "imagenet_r"):
        rec = json.loads((runs / test_set / "seed1" / "record.json").read_text())
        assert rec["config"]["TEST_OOD"] == test_set and rec["config"]["TEST"]["OOD_ID_SPLIT"] == "test"
        z = np.load(runs / test_set / "seed1" / "scores.npz")
        # energy = logsumexp of the saved logits (float64 here; 1e-6 relative covers a float32 trainer score)
        np.testing.assert_allclose(arrays[test_set], logsumexp(z["test__logits"].astype(np.float64), axis=1),
                                   rtol=1e-6)
        np.testing.assert_allclose(arrays["open_set"], logsumexp(z["ood_test__logits"].astype(np.float64), axis=1),
                                   rtol=1e-6)  # every run of the seed draws the same open set
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "5 runs planned, 5 already done, 0 to run" in again.stdout
