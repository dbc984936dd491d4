"""Setup-II end to end on synthetic trees: the real drivers run a mini sweep, the collectors tabulate it."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from helpers import COOP, assert_ood_matches_scores
from synthetic import write_lodo_tree
from synthetic_openset import write_all_openset

TINY_OPTS = ["--", "MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE",
             "(32, 32)", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "DEVICE", "cpu"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from launch import setup2

    base = tmp_path_factory.mktemp("setup2")
    data = str(base / "data")
    write_lodo_tree(data, per_class=6)
    write_all_openset(data)
    common = ["--root", data, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1", "--domains", "sketch",
              "photo", "--lambda2", "1", "10", "--epochs", "2", "--shots", "2", "--output-root",
              str(base / "output"), "--eval-root", str(base / "eval"), "--launcher", "inprocess",
              "--ood", "DTD", "Caltech101"]
    cwd = os.getcwd()
    try:
        assert setup2.main(common + TINY_OPTS, trainer="CRoFT") == 0
        assert setup2.main(common + TINY_OPTS, trainer="CRoFT", evaluate=True) == 0
    finally:
        os.chdir(cwd)
    return base, common


def _records(root):
    out = []
    for dirpath, _, files in os.walk(root):
        if "record.json" in files:
            with open(os.path.join(dirpath, "record.json")) as f:
                out.append((dirpath, json.load(f)))
    return out


def test_sweep_layout_encodes_swept_values(sweep):
    base, _ = sweep
    recs = _records(base / "output")
    assert len(recs) == 4  # 2 lambda2 x 2 domains
    dirs = sorted(os.path.relpath(d, base / "output") for d, _ in recs)
    assert dirs[0].startswith(os.path.join("CRoFT", "PACS_rn50_ep30_l1-15_l2-10_r0.2_rt0.5_g0", "test_on_photo.json",
                                           "seed1", "shots2"))
    for d, rec in recs:
        assert rec["config"]["TRAINER"]["CRoFT"]["lambda2"] in (1.0, 10.0)
        assert os.path.isfile(os.path.join(d, "done"))
    evals = _records(base / "eval")
    assert len(evals) == 8  # x 2 open-set datasets
    for d, rec in evals:
        assert rec["mode"] == "eval"
        assert rec["config"]["TRAINER"]["CRoFT"]["ratio"] == 0.5          # official eval ratios
        assert rec["config"]["TRAINER"]["CRoFT"]["ratio_text"] == 0.0
        assert_ood_matches_scores(d, rec, ("energy", "mcm", "msp", "knn"))
        assert {"energy", "mcm", "msp", "knn"} <= set(rec["metrics"]["ood"])
        assert os.path.getsize(os.path.join(d, "energy_hist.png")) > 1000
        z = np.load(os.path.join(d, "scores.npz"))
        assert "ood_test__score_energy" in z.files and "val__features" in z.files
        log = open(os.path.join(d, "log.txt")).read()
        assert "OODD_FPR95:" in log and "AUROC:" in log and "* accuracy:" in log


def test_rerun_runs_nothing_new(sweep, capsys):
    from launch import setup2

    base, common = sweep
    stamps = {d: os.path.getmtime(os.path.join(d, "done")) for d, _ in _records(base / "output")}
    cwd = os.getcwd()
    try:
        assert setup2.main(common + TINY_OPTS, trainer="CRoFT") == 0
        assert setup2.main(common + TINY_OPTS, trainer="CRoFT", evaluate=True) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "4 runs planned, 4 already done, 0 to run" in out and "8 runs planned, 8 already done, 0 to run" in out
    assert stamps == {d: os.path.getmtime(os.path.join(d, "done")) for d, _ in _records(base / "output")}


def test_collectors_match_records(sweep, capsys):
    from launch import collect

    base, _ = sweep
    assert collect.main("oodg", ["--root", str(base / "output"), "--select", "none"]) == 0
    text = capsys.readouterr().out
    assert "| method | setting | photo | sketch | Avg | seeds |" in text
    for d, rec in _records(base / "output"):
        assert f"{rec['metrics']['test']['accuracy']:.2f}" in text
    with open(base / "output" / "setup2_oodg.csv") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["setting"], r["domain"]): float(r["accuracy_mean"]) for r in rows}
    for d, rec in _records(base / "output"):
        # 2 shots are not the preset's 16: the setting shows them (tests/test_run_identity.py)
        setting = "rn50_ep30_" + d.split("PACS_rn50_ep30_")[1].split(os.sep)[0] + f"_shots{rec['shots']}"
        assert by_key[(setting, rec["test_env"][8:-5])] == pytest.approx(rec["metrics"]["test"]["accuracy"], abs=1e-4)

    assert collect.main("oodd", ["--root", str(base / "eval"), "--select", "none"]) == 0
    text = capsys.readouterr().out
    assert "DTD AUROC↑" in text and "Caltech101 FPR95↓" in text and "| energy |" in text and "| knn |" in text
    with open(base / "eval" / "setup2_oodd.csv") as f:
        rows = list(csv.DictReader(f))
    recs = [r for _, r in _records(base / "eval") if r["dataset"] == "PACS_DTD"
            and r["config"]["TRAINER"]["CRoFT"]["lambda2"] == 10.0]
    expect = np.mean([100 * r["metrics"]["ood"]["energy"]["auroc"] for r in recs])  # avg over the 2 domains
    got = [float(r["mean"]) for r in rows if r["ood"] == "DTD" and r["score"] == "energy" and r["metric"] == "auroc"
           and "l2-10_" in r["setting"]]
    assert got == [pytest.approx(expect, abs=1e-3)]


def _val_choice(base):
    """Per held-out domain, the lambda2 whose training run has the best validation accuracy (first on ties)."""
    best = {}
    for _, rec in sorted(_records(base / "output"), key=lambda r: r[1]["config"]["TRAINER"]["CRoFT"]["lambda2"]):
        dom, val = rec["test_env"][8:-5], rec["metrics"]["val"]["best_accuracy"]
        if dom not in best or val > best[dom][0]:
            best[dom] = (val, rec["config"]["TRAINER"]["CRoFT"]["lambda2"], rec["metrics"]["test"]["accuracy"])
    return best


def test_collectors_select_by_validation(sweep, capsys):
    from launch import collect

    base, _ = sweep
    best = _val_choice(base)
    assert collect.main("oodg", ["--root", str(base / "output")]) == 0  # default: --select val
    text = capsys.readouterr().out
    # tiny runs are not the official preset's runs: labelled so (tests/test_run_identity.py)
    assert "> selection: val" in text and "> preset: not official" in text and "> switches: all official" in text
    with open(base / "output" / "setup2_oodg.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["method"].startswith("CRoFT (not official ")]
    assert {r["selection"] for r in rows} == {"val"}
    got = {r["domain"]: float(r["accuracy_mean"]) for r in rows}
    for dom, (_, _, acc) in best.items():
        assert got[dom] == pytest.approx(acc, abs=1e-4)
    assert len({r["setting"] for r in rows}) == 1  # one row per method and config
    assert collect.main("oodd", ["--root", str(base / "eval")]) == 0
    text = capsys.readouterr().out
    assert "> FPR95: energy → fpr95_id_percentile, knn → fpr95_tpr_id" in text
    with open(base / "eval" / "setup2_oodd.csv") as f:
        rows = list(csv.DictReader(f))
    recs = [r for _, r in _records(base / "eval") if r["dataset"] == "PACS_DTD"
            and r["config"]["TRAINER"]["CRoFT"]["lambda2"] == best[r["test_env"][8:-5]][1]]
    assert len(recs) == 2
    for score, key in (("energy", "fpr95_id_percentile"), ("knn", "fpr95_tpr_id")):
        expect = np.mean([100 * r["metrics"]["ood"][score][key] for r in recs])
        got = [float(r["mean"]) for r in rows if r["ood"] == "DTD" and r["score"] == score and r["metric"] == "fpr95"]
        assert got == [pytest.approx(expect, abs=1e-3)]
        assert {r["fpr95"] for r in rows if r["score"] == score} == {key}


def test_collectors_oracle_is_labelled(sweep, capsys):
    from launch import collect

    base, _ = sweep
    assert collect.main("oodg", ["--root", str(base / "output"), "--select", "oracle"]) == 0
    text = capsys.readouterr().out
    assert "> selection: ORACLE" in text
    with open(base / "output" / "setup2_oodg.csv") as f:
        rows = list(csv.DictReader(f))
    per_dom = {}
    for _, rec in _records(base / "output"):
        dom = rec["test_env"][8:-5]
        per_dom[dom] = max(per_dom.get(dom, 0.0), rec["metrics"]["test"]["accuracy"])
    for r in rows:
        if r["domain"] in per_dom:
            assert float(r["accuracy_mean"]) == pytest.approx(per_dom[r["domain"]], abs=1e-4)
            assert r["selection"] == "oracle"


def test_collector_lists_missing_runs(sweep, capsys, tmp_path):
    from launch import collect
    from launch.sweep import Job, write_manifest

    base, _ = sweep
    write_manifest(str(base / "output"), "extra", [Job("CRoFT/never/run", str(tmp_path / "never"), [],
                                                       {"kind": "train", "dataset": "PACS"})])
    collect.main("oodg", ["--root", str(base / "output")])
    assert "Missing runs (1):" in capsys.readouterr().out
    os.remove(base / "output" / "sweeps" / "extra.json")


def test_dry_run_and_missing_root(capsys, monkeypatch):
    from launch import setup2

    monkeypatch.delenv("DATA", raising=False)
    cwd = os.getcwd()
    try:
        assert setup2.main(["--datasets", "PACS"], trainer="CRoFT") == 2
        assert "DATA" in capsys.readouterr().err
        assert setup2.main(["--root", "/nonexistent", "--dry-run"], trainer="CRoFT") == 0
        out = capsys.readouterr().out
        assert setup2.main(["--root", "/nonexistent", "--dry-run", "--preset", "grid"], trainer="CRoFT") == 0
        grid = capsys.readouterr().out
    finally:
        os.chdir(cwd)
    # the grid: PACS 5 lambda2 x 2 cfgs + VLCS 5 x 3 lambda1 x 3 ratio pairs x 2 cfgs, x 4 domains x 3 seeds;
    # official: what trained officially, VLCS only the (0.2, 0.5) ratio pair (5 x 3 x 2 cfgs), + the selected PACS
    # model (lambda1 5 / lambda2 1000, not in the PACS grid) x 2 cfgs: (12 + 30) x 4 x 3
    assert "1200 runs planned" in grid
    assert "504 runs planned" in out and "PACS_ViT_ep30_l1-5_l2-1000_r0.2_rt0.5_g1/" in out
    assert "_r0.2_rt0/" not in out and "_r0.5_rt0/" not in out and "VLCS_rn50_ep30_l1-0_l2-1_r0.2_rt0.5_g5/" in out


def test_knn_script(sweep, capsys):
    import importlib.util

    base, common = sweep
    spec = importlib.util.spec_from_file_location("knn", os.path.join(COOP, "scripts", "CRoFT", "test_setup2_knn.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # the evaluation driver's flags plan the sweep's evaluation runs; one not done is run first (the launcher's)
    gone = sorted(d for d, _ in _records(base / "eval"))[0]
    os.remove(os.path.join(gone, "done"))
    assert mod.main(common + ["--k", "1", "5", "1000"] + TINY_OPTS) == 0
    out = capsys.readouterr().out
    assert "8 runs planned, 7 already done, 1 to run" in out and os.path.isfile(os.path.join(gone, "done"))
    assert "| runs | K | FPR95↓ | AUROC↑ |" in out and os.path.isfile(base / "eval" / "setup2_knn.csv")
    assert "> FPR95: knn → fpr95_tpr_id (official KNN convention)" in out and "all held-out images (official)" in out
    # K beyond the bank (the source val features of a run) is a row saying so, not dropped
    banks = {len(np.load(os.path.join(d, "scores.npz"))["val__features"])
             for d, _ in _records(base / "eval")}
    rows = [ln for ln in out.splitlines() if ln.startswith("| CRoFT/")]
    assert len(rows) == 4 * 3  # (2 lambda2 x 2 open-set datasets) x K 1, 5, 1000
    assert sum(f"| 1000 | K > bank ({min(banks)}) | K > bank ({min(banks)}) |" in ln for ln in rows) == 4
    with open(base / "eval" / "setup2_knn.csv") as f:
        notes = {(r["k"], r["note"]) for r in csv.DictReader(f)}
    assert notes == {("1", ""), ("5", ""), ("1000", f"K > bank ({min(banks)})")}
    # --dry-run lists the planned runs and computes nothing; a misspelt name is one line, exit code 2
    assert mod.main(common + ["--dry-run"] + TINY_OPTS) == 0
    out = capsys.readouterr().out
    assert "[done] CRoFT/PACS_DTD+Caltech101_rn50_ep30" in out and "| runs |" not in out
    bad = [a if a != "photo" else "foto" for a in common]
    assert mod.main(bad + TINY_OPTS) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --domains 'foto' is not a PACS domain (choose from sketch, photo, cartoon, art_painting); " \
                  "did you mean 'photo'?"


def test_shell_driver_matches_python_driver(sweep, tmp_path):
    """croft_pacs.sh trains the 4 official PACS domains into the directories run_setup2.py uses, then skips."""
    import subprocess

    from launch import setup2

    base, _ = sweep
    out = tmp_path / "shell_out"
    import sys

    env = dict(os.environ, DATA=str(base / "data"), OUTPUT_ROOT=str(out), HF_HUB_OFFLINE="1", PYTHON=sys.executable)
    cmd = ["bash", "scripts/CRoFT/croft_pacs.sh", "PACS", "rn50_ep30", "1", "2", "10", *TINY_OPTS[1:],
           "OPTIM.MAX_EPOCH", "1"]
    res = subprocess.run(cmd, cwd=COOP, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    cwd = os.getcwd()
    try:
        _, jobs = setup2.plan(["--root", str(base / "data"), "--datasets", "PACS", "--cfgs", "rn50_ep30",
                               "--seeds", "1", "--shots", "2", "--lambda2", "10", "--output-root", str(out)],
                              trainer="CRoFT")
    finally:
        os.chdir(cwd)
    assert len(jobs) == 4 and all(j.done() for j in jobs)
    again = subprocess.run(cmd, cwd=COOP, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("(skip)") == 4


def test_failing_run_does_not_stop_the_sweep(tmp_path):
    from launch.sweep import Job, run_jobs

    data = tmp_path / "d"
    write_lodo_tree(str(data), per_class=3)
    base = ["--root", str(data), "--trainer", "ZeroshotCLIP", "--dataset-config-file", "configs/datasets/PACS.yaml",
            "--config-file", "configs/trainers/ZeroshotCLIP/rn50_ep30.yaml"]
    opts = ["MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)",
            "DATALOADER.NUM_WORKERS", "0"]
    jobs = [Job(name, str(tmp_path / name), [*base, "--output-dir", str(tmp_path / name), *opts, "TEST_ENV", env])
            for name, env in (("bad", "mars"), ("good", "sketch"))]
    cwd = os.getcwd()
    os.chdir(COOP)
    try:
        assert run_jobs(jobs, launcher="inprocess") == 1
    finally:
        os.chdir(cwd)
    assert jobs[1].done() and not jobs[0].done() and not os.path.exists(tmp_path / "bad")


ALL_TRAINERS = ["ZeroshotCLIP", "CoOp", "CoCoOp", "CLIP_Adapter", "TIP_ADAPTER", "DPLCLIP", "BCAL", "LoCoOp", "CRoFT"]


def test_every_method_in_one_table(tmp_path, capsys):
    """The Setup-II mini sweep for every trainer: one collector table with one row per method."""
    from launch import collect, setup2

    data = str(tmp_path / "data")
    write_lodo_tree(data, per_class=4)
    write_all_openset(data)
    common = ["--root", data, "--trainer", *ALL_TRAINERS, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds",
              "1", "--domains", "sketch", "--lambda2", "1", "--epochs", "1", "--shots", "2", "--output-root",
              str(tmp_path / "output"), "--eval-root", str(tmp_path / "eval"), "--launcher", "inprocess", "--ood",
              "DTD"]
    cwd = os.getcwd()
    try:
        assert setup2.main(common + TINY_OPTS) == 0
        assert setup2.main(common + TINY_OPTS, evaluate=True) == 0
    finally:
        os.chdir(cwd)
    capsys.readouterr()
    collect.main("oodg", ["--root", str(tmp_path / "output")])
    oodg = capsys.readouterr().out
    collect.main("oodd", ["--root", str(tmp_path / "eval"), "--scores", "energy"])
    oodd = capsys.readouterr().out
    for table in (oodg, oodd):
        rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
        methods = [r.split(" | ")[0][2:].split(" (not official ") for r in rows]  # tiny runs: not official
        assert all(len(m) == 2 for m in methods) and sorted(m[0] for m in methods) == sorted(ALL_TRAINERS), table
