"""The official hyper-parameter tables reach the runs: planned commands, saved config.yaml, presets, shell access.

Expected values are written here from the spec (sections 3, 4.1, 4.4, 1.10), not read from launch/official.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from helpers import COOP
from synthetic import write_lodo_tree
from synthetic_imagenet import write_imagenet_tree
from synthetic_openset import write_all_openset

TINY = ["--", "MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DEVICE", "cpu", "DATASET.SETUP1_OOD_SIZE", "10"]

# spec 4.4 (configs: train batch, LR, epochs), spec 3 (alpha/beta, precision, shots, Bayes-CAL weights)
SPEC_CFG = {("TIP_ADAPTER", "ViT_ep30"): (32, 0.001, 50), ("TIP_ADAPTER", "rn50_ep30"): (256, 0.002, 30),
            ("CoCoOp", "ViT_ep30"): (4, 0.002, 30)}
SPEC_NODE = {
    ("TIP_ADAPTER", 1): ("TIP_ADAPTER", {"ALPHA": 1.17, "BETA": 1.0, "PREC": "fp16"}),
    ("TIP_ADAPTER", 2): ("TIP_ADAPTER", {"ALPHA": 1.0, "BETA": 10.0, "PREC": "fp16"}),
    ("CoOp", 1): ("COOP", {"N_CTX": 16, "PREC": "fp16", "CSC": False}),
    ("CoOp", 2): ("COOP", {"N_CTX": 16, "PREC": "fp16", "CSC": False}),
    ("CoCoOp", 1): ("COCOOP", {"N_CTX": 16, "PREC": "fp16"}),
    ("CoCoOp", 2): ("COCOOP", {"N_CTX": 16, "PREC": "fp16"}),
    ("CLIP_Adapter", 1): ("CLIP_ADAPTER", {"RATIO": 0.2, "PREC": "fp32"}),
    ("CLIP_Adapter", 2): ("CLIP_ADAPTER", {"RATIO": 0.2, "PREC": "fp32"}),
    ("DPLCLIP", 1): ("DPLCLIP", {"PREC": "fp16"}),
    ("DPLCLIP", 2): ("DPLCLIP", {"PREC": "fp16"}),
    ("BCAL", 1): ("BCAL", {"ALPHA1": 0.01, "ALPHA2": 0.5, "ALPHA3": 0.01, "PREC": "fp16"}),
    ("BCAL", 2): ("BCAL", {"ALPHA1": 0.01, "ALPHA2": 0.5, "ALPHA3": 0.01, "PREC": "fp16"}),
    ("CRoFT", 1): ("CRoFT", {"ratio": 0.2, "ratio_text": 0.5, "WCCF": True}),
    ("CRoFT", 2): ("CRoFT", {"ratio": 0.2, "ratio_text": 0.5, "WCCF": True}),
    ("ZeroshotCLIP", 1): ("ZSCLIP", {"PREC": "fp16"}),
    ("ZeroshotCLIP", 2): ("ZSCLIP", {"PREC": "fp16"}),
}
SPEC_SHOTS_SETUP1 = {"CLIP_Adapter": 4}


def _plan(module, argv, trainer, evaluate=False):
    cwd = os.getcwd()
    try:
        return module.plan(argv, trainer=trainer, evaluate=evaluate)[1]
    finally:
        os.chdir(cwd)


def _opts(argv):
    """The trailing KEY VALUE overrides of a planned train.py command line (last value wins, as in yacs)."""
    rest, out, i = argv[argv.index("--output-dir") + 2:] if "--output-dir" in argv else argv, {}, 0
    while i < len(rest):
        if rest[i] == "--eval-only":
            i += 1
        elif rest[i] == "--eval-open-set":  # a one-pass evaluation job: DATASET_CONFIG_FILE OUTPUT_DIR per run
            i += 3
        elif rest[i].startswith("--"):
            i += 2
        else:
            out[rest[i]] = rest[i + 1]
            i += 2
    return out


@pytest.mark.parametrize("setup,alpha,beta", [(1, "1.17", "1"), (2, "1", "10")])
def test_planned_tip_adapter_runs_carry_alpha_beta(setup, alpha, beta):
    from launch import setup1, setup2

    mod = setup1 if setup == 1 else setup2
    extra = ["--datasets", "PACS"] if setup == 2 else []
    for evaluate in (False, True):
        jobs = _plan(mod, ["--root", "/nonexistent", "--seeds", "1", *extra], "TIP_ADAPTER", evaluate)
        assert jobs
        for j in jobs:
            o = _opts(j.argv)
            assert (o["TRAINER.TIP_ADAPTER.ALPHA"], o["TRAINER.TIP_ADAPTER.BETA"]) == (alpha, beta), j.name
            cfg = j.labels["cfg"]
            batch, lr, ep = SPEC_CFG[("TIP_ADAPTER", cfg)]
            assert (int(o["DATALOADER.TRAIN_X.BATCH_SIZE"]), float(o["OPTIM.LR"]), int(o["OPTIM.MAX_EPOCH"])) \
                == (batch, lr, ep)


def test_setup1_shots_per_trainer():
    from launch import setup1

    for trainer in ("CLIP_Adapter", "CoOp"):
        jobs = _plan(setup1, ["--root", "/nonexistent", "--seeds", "1"], trainer)
        assert sorted({j.labels["shots"] for j in jobs}) == ([4] if trainer == "CLIP_Adapter" else [1, 16, 32])


def test_croft_setup2_presets_and_selected_models():
    from launch import setup2

    base = ["--root", "/nonexistent", "--seeds", "1", "--domains", "sketch", "--ood", "DTD"]
    ev = _plan(setup2, base + ["--datasets", "PACS", "VLCS"], "CRoFT", evaluate=True)
    # official: only the selected models, evaluated at ratio 0.5 / ratio_text 0 (spec 1.10)
    got = sorted((j.labels["dataset"], j.labels["cfg"], j.labels["setting"]) for j in ev)
    assert got == [("PACS", "ViT_ep30", "l1-5_l2-1000_r0.2_rt0.5_g1"), ("PACS", "rn50_ep30", "l1-5_l2-1000_r0.2_rt0.5_g0"),
                   ("VLCS", "ViT_ep30", "l1-15_l2-1000_r0.2_rt0.5_g5"),
                   ("VLCS", "rn50_ep30", "l1-15_l2-1000_r0.2_rt0.5_g5")]
    for j in ev:
        o = _opts(j.argv)
        assert (o["TRAINER.CRoFT.ratio"], o["TRAINER.CRoFT.ratio_text"]) == ("0.5", "0")
        assert o["TRAINER.CRoFT.lambda1"] in ("5", "15") and j.labels["selected"] is True
        assert o["PROTOCOL.PRESET"] == "official"
    grid = _plan(setup2, base + ["--datasets", "PACS", "--preset", "grid"], "CRoFT", evaluate=True)
    assert len(grid) == 10 and all(_opts(j.argv)["TRAINER.CRoFT.lambda1"] == "15" for j in grid)
    # the selected PACS model is trained by the official preset (not part of the PACS grid)
    tr = _plan(setup2, base + ["--datasets", "PACS", "--cfgs", "rn50_ep30"], "CRoFT")
    assert len(tr) == 6 and sum(j.labels["selected"] for j in tr) == 1


def test_user_overrides_win_over_official_values_in_every_run():
    from launch import setup2

    base = ["--root", "/x", "--datasets", "PACS", "--domains", "sketch", "--seeds", "1", "--ood", "DTD",
            "--cfgs", "ViT_ep30", "--", "TRAINER.CRoFT.ratio", "0.3", "OPTIM.MAX_EPOCH", "2"]
    for evaluate in (False, True):
        for j in _plan(setup2, base, "CRoFT", evaluate):
            o = _opts(j.argv)
            assert o["TRAINER.CRoFT.ratio"] == "0.3" and o["OPTIM.MAX_EPOCH"] == "2"


def test_unknown_dataset_needs_explicit_grid_values():
    from launch import official, setup2

    with pytest.raises(SystemExit, match="DigitsDG"):
        official.sweep_grid("CRoFT", 2, "DigitsDG")
    with pytest.raises(SystemExit, match="--ratios"):
        _plan(setup2, ["--root", "/x", "--datasets", "DigitsDG", "--domains", "mnist", "--lambda1", "1"], "CRoFT")
    jobs = _plan(setup2, ["--root", "/x", "--datasets", "DigitsDG", "--domains", "mnist", "--seeds", "1",
                          "--cfgs", "rn50_ep30", "--lambda1", "1", "--lambda2", "2", "--ratios", "0.2,0.5",
                          "--gen-step", "3"], "CRoFT")
    assert [j.labels["setting"] for j in jobs] == ["l1-1_l2-2_r0.2_rt0.5_g3"]
    # baselines have no grid: any dataset plans one setting
    assert len(_plan(setup2, ["--root", "/x", "--datasets", "DigitsDG", "--domains", "mnist", "--seeds", "1",
                              "--cfgs", "rn50_ep30"], "CoOp")) == 1


def test_module_prints_overrides_for_shell_scripts():
    run = subprocess.run([sys.executable, "-m", "launch.official", "TIP_ADAPTER", "2", "--cfg", "rn50_ep30"],
                         cwd=COOP, capture_output=True, text=True)
    assert run.returncode == 0
    toks = run.stdout.split()
    o = {toks[i]: toks[i + 1] for i in range(0, len(toks), 2)}
    assert o["TRAINER.TIP_ADAPTER.BETA"] == "10" and o["DATALOADER.TRAIN_X.BATCH_SIZE"] == "256"
    ev = subprocess.run([sys.executable, "-m", "launch.official", "CRoFT", "2", "--eval"], cwd=COOP,
                        capture_output=True, text=True)
    assert "TRAINER.CRoFT.ratio 0.5 TRAINER.CRoFT.ratio_text 0" in ev.stdout
    bad = subprocess.run([sys.executable, "-m", "launch.official", "NoSuchTrainer", "1"], cwd=COOP,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "NoSuchTrainer" in bad.stderr and not bad.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("official")
    write_lodo_tree(str(base / "d2"), per_class=4)
    write_all_openset(str(base / "d2"))
    write_imagenet_tree(str(base / "d1"))
    return base


def _run_one(data, setup, trainer):
    """Run the first planned training command of (trainer, setup) for 1 epoch; return its config.yaml."""
    from launch import setup1, setup2
    from launch.sweep import run_jobs

    if setup == 1:
        argv = ["--root", str(data / "d1"), "--seeds", "1", "--lambda1", "5", "--lambda2", "5"]
        mod = setup1
    else:
        argv = ["--root", str(data / "d2"), "--seeds", "1", "--datasets", "PACS", "--domains", "sketch",
                "--lambda2", "10"]
        mod = setup2
    out = data / f"out_{trainer}_{setup}"
    argv += ["--output-root", str(out), "--epochs", "1", *TINY]
    cwd = os.getcwd()
    try:
        _, jobs = mod.plan(argv, trainer=trainer)
        job = jobs[-1]  # the last config (ViT_ep30 in Setup-II) and the largest shot count
        assert run_jobs([job], launcher="inprocess") == 0
    finally:
        os.chdir(cwd)
    with open(os.path.join(job.output_dir, "config.yaml")) as f:
        return job, yaml.safe_load(f)


def _check(job, cfg, setup, trainer):
    node, want = SPEC_NODE[(trainer, setup)]
    for key, val in want.items():
        assert cfg["TRAINER"][node][key] == pytest.approx(val) if isinstance(val, float) else \
            cfg["TRAINER"][node][key] == val, (trainer, setup, key)
    batch, lr, _ = SPEC_CFG.get((trainer, job.labels["cfg"]), (32, 0.002, 30))
    assert cfg["DATALOADER"]["TRAIN_X"]["BATCH_SIZE"] == batch
    assert cfg["DATALOADER"]["TEST"]["BATCH_SIZE"] == 100
    assert cfg["OPTIM"]["LR"] == pytest.approx(lr) and cfg["OPTIM"]["MAX_EPOCH"] == 1  # --epochs wins
    assert cfg["DATASET"]["NUM_SHOTS"] == (SPEC_SHOTS_SETUP1.get(trainer, 32) if setup == 1 else 16)
    assert cfg["PROTOCOL"]["PRESET"] == "official"


@pytest.mark.parametrize("setup", [1, 2])
def test_planned_tip_adapter_run_saves_official_config(data, setup):
    import json

    job, cfg = _run_one(data, setup, "TIP_ADAPTER")
    _check(job, cfg, setup, "TIP_ADAPTER")
    with open(os.path.join(job.output_dir, "record.json")) as f:
        prot = json.load(f)["protocol"]
    assert prot["preset"] == "official" and prot["fixed"] == []
    assert prot["switches"]["TRAINER.TIP_ADAPTER.CACHE_MODE"] == "official"
    assert prot["switches"]["OPTIM.WEIGHT_DECAY"] == pytest.approx(0.1)
    assert prot["fpr95_convention"] == {"energy": "fpr95_val_threshold", "knn": "fpr95_tpr_id"}
    if setup == 1:  # the training class samples its open-set images per seed (seeded official cache)
        assert prot["dataset"]["setup1_ood_sample"] == "per_seed"


def test_protocol_block_names_fixed_switches():
    from dassl.config import cfg_to_dict, get_cfg_default
    from dassl.engine.protocol import protocol_block

    cfg = get_cfg_default()
    cfg.OPTIM.WEIGHT_DECAY = 5e-4
    cfg.TEST.KNN_ID_CORRECT_ONLY = True
    block = protocol_block(cfg_to_dict(cfg))
    assert block["preset"] == "manual" and block["fixed"] == ["OPTIM.WEIGHT_DECAY", "TEST.KNN_ID_CORRECT_ONLY"]
    assert "TRAINER.CRoFT.FIX_EDR_CONSISTENT" not in block["switches"]  # not a key of this config


@pytest.mark.slow
@pytest.mark.parametrize("setup", [1, 2])
@pytest.mark.parametrize("trainer", ["ZeroshotCLIP", "CoOp", "CoCoOp", "CLIP_Adapter", "DPLCLIP", "BCAL", "CRoFT"])
def test_every_planned_run_saves_official_config(data, setup, trainer):
    import trainers  # noqa: F401
    from dassl.engine import TRAINER_REGISTRY

    if trainer not in TRAINER_REGISTRY:
        pytest.skip(f"trainer {trainer} is not registered in this tree")
    if (trainer, setup) == ("BCAL", 1):  # spec 3: the official Setup-I Bayes-CAL scripts cannot run (no domains)
        from launch import setup1
        from launch.sweep import run_jobs

        cwd = os.getcwd()
        try:
            with pytest.raises(SystemExit) as refused:  # the driver refuses the plan, naming the fix
                setup1.plan(["--root", str(data / "d1"), "--seeds", "1", "--shots", "1", "--output-root",
                             str(data / "bcal1"), "--epochs", "1", *TINY], trainer="BCAL")
            assert refused.value.code == 2
            jobs = setup1.plan(["--root", str(data / "d1"), "--seeds", "1", "--shots", "1", "--output-root",
                                str(data / "bcal1"), "--epochs", "1", *TINY, "TRAINER.BCAL.DOMAIN_NAMES",
                                "['imagenet']"], trainer="BCAL")[1]
            assert run_jobs(jobs, launcher="inprocess") == 0
        finally:
            os.chdir(cwd)
        return
    job, cfg = _run_one(data, setup, trainer)
    _check(job, cfg, setup, trainer)
