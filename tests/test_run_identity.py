"""Run identity: a run directory is what its config says (``dassl.engine.identity``, ``launch.runid``).

Fingerprints cover every config value but the listed ones; ``train.py`` and the drivers refuse a directory holding
a finished run (or checkpoints) of another fingerprint, naming the differing keys, and ``--rerun-changed`` replaces
it; evaluation runs fingerprint the model they evaluate; collectors label a run that is not the preset's as such;
the shell and Python drivers make the same runs. Expected values: the keys the test itself changed, the runs
themselves (same process, same batching: bitwise), hand-written directory layouts.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import COOP, TINY, run_cli
from procs import run_train_forked
from synthetic import write_lodo_tree

CFG = os.path.join(COOP, "configs", "trainers", "CRoFT", "rn50_ep30.yaml")
PACS = os.path.join(COOP, "configs", "datasets", "PACS.yaml")
FAST = ["DATALOADER.TRAIN_X.BATCH_SIZE", "8", "DATALOADER.TEST.BATCH_SIZE", "16", "VERBOSE", "False",
        "TEST_ENV", "sketch"]


@pytest.fixture(scope="module", autouse=True)
def _warm():
    import train  # noqa: F401  (imported once; forked children inherit it)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("data"))
    write_lodo_tree(r, per_class=4)
    return r


def argv(root: str, out: str, epochs: int = 1, flags=(), extra=()) -> list[str]:
    return ["--root", root, "--seed", "1", "--trainer", "CRoFT", "--dataset-config-file", PACS,
            "--config-file", CFG, "--output-dir", out, *flags, *TINY, *FAST, "OPTIM.MAX_EPOCH", str(epochs), *extra]


def record(d: str) -> dict:
    with open(os.path.join(d, "record.json"), encoding="utf-8") as f:
        return json.load(f)


def cfg_of(root: str, extra=()) -> object:
    import train

    return train.setup_cfg(train.get_parser().parse_args(argv(root, "/tmp/x", extra=extra)))


# ------------------------------------------------------------------------------------------ the fingerprint
_MISSING = object()


def _get(tree, dotted: str):
    for part in dotted.split("."):
        if part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def test_fingerprint_covers_every_value_but_the_listed_keys(root):
    from dassl.engine.identity import NOT_FINGERPRINTED, differences, run_identity

    from dassl.config import cfg_to_dict

    cfg = cfg_of(root)
    base = run_identity(cfg)
    assert len(base["fingerprint"]) == 16
    expected = json.loads(json.dumps(cfg_to_dict(cfg)))  # the config, nothing else (no versions, no paths)
    for key in NOT_FINGERPRINTED:  # every listed key is a config key, and it is left out
        assert _get(cfg, key) is not _MISSING and _get(base["fingerprinted"], key) is _MISSING, key
        *parents, leaf = key.split(".")
        node = expected
        for part in parents:
            node = node[part]
        del node[leaf]
    assert base["fingerprinted"] == expected
    same = {"OUTPUT_DIR": "/elsewhere", "DATASET.ROOT": "/data2", "DEVICE": "auto", "VERBOSE": "True",
            "TRAIN.PRINT_FREQ": "1", "TRAIN.CHECKPOINT_FREQ": "3", "TEST.SAVE_PLOTS": "False",
            "TEST.SAVE_SCORES": "False", "PROTOCOL.PRESET": "official", "FEATURE_CACHE.DIR": "/cache"}
    for key, value in same.items():
        assert run_identity(cfg_of(root, [key, value]))["fingerprint"] == base["fingerprint"], key
    changed = {"OPTIM.MAX_EPOCH": 30, "DATASET.NUM_SHOTS": 2, "TRAINER.CRoFT.lambda2": 10.0,
               "DATALOADER.TEST.BATCH_SIZE": 100, "SEED": 2, "DATALOADER.NUM_WORKERS": 1}
    for key, new in changed.items():
        other = run_identity(cfg_of(root, [key, repr(new)]))
        assert other["fingerprint"] != base["fingerprint"], key
        assert differences(base, other) == [f"{key}: {_get(cfg, key)!r} -> {new!r}"]
    assert run_identity(cfg, "eval")["fingerprint"] != base["fingerprint"]
    # a path-valued key enters by file name: a moved weights file is the same run, another file is not
    a = run_identity(cfg_of(root, ["MODEL.BACKBONE.WEIGHTS", "/a/RN50.pt"]))
    assert a["fingerprint"] == run_identity(cfg_of(root, ["MODEL.BACKBONE.WEIGHTS", "/b/RN50.pt"]))["fingerprint"]
    assert a["fingerprint"] != run_identity(cfg_of(root, ["MODEL.BACKBONE.WEIGHTS", "/a/RN101.pt"]))["fingerprint"]


def test_settings_left_out_of_the_fingerprint_change_no_number(root, tmp_path):
    """Two runs differing only in non-fingerprinted keys (logging, printing, checkpoints kept, preset name): the
    same fingerprint, record metrics and weights, bit for bit (same process, same batching)."""
    a = run_cli(argv(root, str(tmp_path / "a"), epochs=2))
    b = run_cli(argv(root, str(tmp_path / "b"), epochs=2, extra=["TRAIN.CHECKPOINT_FREQ", "1", "VERBOSE", "True",
                                                               "TRAIN.PRINT_FREQ", "1", "PROTOCOL.PRESET", "grid",
                                                               "DATASET.VERIFY_IMAGES", "False"]))
    assert a["fingerprint"] == b["fingerprint"]
    assert (a["metrics"], a["val_history"], a["best_epoch"]) == (b["metrics"], b["val_history"], b["best_epoch"])
    for name in ("model.pth.tar-2", "model-best.pth.tar"):
        sa = torch.load(tmp_path / "a" / "clip_adapter" / name, weights_only=True)["state_dict"]
        sb = torch.load(tmp_path / "b" / "clip_adapter" / name, weights_only=True)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the record and identity.json carry the fingerprint and the fingerprinted values
    with open(tmp_path / "a" / "identity.json") as f:
        ident = json.load(f)
    assert ident == a["identity"] and ident["fingerprint"] == a["fingerprint"]
    assert ident["fingerprinted"]["OPTIM"]["MAX_EPOCH"] == 2 and "OUTPUT_DIR" not in ident["fingerprinted"]


def test_older_run_directories_are_identified_from_their_config(root, tmp_path):
    """Directories written before identity.json existed: a training run's identity comes from record.json or,
    unfinished, from config.yaml (the same fingerprint train.py computes now)."""
    from dassl.engine.identity import stored_identity

    out = str(tmp_path / "old")
    rec = run_cli(argv(root, out))
    os.unlink(os.path.join(out, "identity.json"))
    legacy = record(out)
    legacy.pop("identity"), legacy.pop("fingerprint")
    with open(os.path.join(out, "record.json"), "w") as f:
        json.dump(legacy, f)
    assert stored_identity(out)["fingerprint"] == rec["fingerprint"]
    for name in ("record.json", "done"):
        os.unlink(os.path.join(out, name))
    assert stored_identity(out)["fingerprint"] == rec["fingerprint"]


# ------------------------------------------------------------------------------------------ train.py by hand
def refused_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_train_py_refuses_a_finished_run_of_another_fingerprint(root, tmp_path):
    out = str(tmp_path / "run")
    first = run_cli(argv(root, out, epochs=1))
    before = open(os.path.join(out, "record.json")).read()
    line = refused_line(run_train_forked(argv(root, out, epochs=2), str(tmp_path)))
    assert "holds a finished run with another configuration (OPTIM.MAX_EPOCH: 1 -> 2)" in line
    assert "--rerun-changed" in line
    assert open(os.path.join(out, "record.json")).read() == before  # untouched
    res = run_train_forked(argv(root, out, epochs=2, flags=["--rerun-changed"]), str(tmp_path))
    assert res.returncode == 0, res.stderr
    rec = record(out)
    assert rec["fingerprint"] != first["fingerprint"] and rec["config"]["OPTIM"]["MAX_EPOCH"] == 2
    assert [e["epoch"] for e in rec["val_history"]] == [1, 2] and rec["segments"][0]["from_epoch"] == 0
    log = open(os.path.join(out, "log.txt")).read()
    assert log.count("** Config **") == 1 and "log continues" not in log  # the old run's log went with it
    # the same command again continues the same run (its own fingerprint): no refusal
    assert run_train_forked(argv(root, out, epochs=2), str(tmp_path)).returncode == 0


def test_checkpoints_of_another_run_are_never_resumed(root, tmp_path):
    out = str(tmp_path / "run")
    run_cli(argv(root, out, epochs=2))
    for name in ("record.json", "done"):  # an unfinished run: checkpoints only
        os.unlink(os.path.join(out, name))
    line = refused_line(run_train_forked(argv(root, out, epochs=2, extra=["OPTIM.LR", "0.01"]), str(tmp_path)))
    assert "holds checkpoints of a run with another configuration (OPTIM.LR: 0.002 -> 0.01)" in line
    # --resume DIR names another run's checkpoints: refused by the fingerprint they carry
    line = refused_line(run_train_forked(argv(root, str(tmp_path / "new"), epochs=2, flags=["--resume", out],
                                              extra=["OPTIM.LR", "0.01"]), str(tmp_path)))
    assert "belongs to another run" in line and "model.pth.tar-2" in line
    assert not os.path.exists(tmp_path / "new" / "done")


def test_replacing_a_run_removes_done_first_and_its_identity_last(root, tmp_path, monkeypatch):
    """What ``--rerun-changed`` deletes, in an order where a kill at any point leaves no ``done``."""
    from dassl.engine import identity

    out = str(tmp_path / "run")
    run_cli(argv(root, out))
    keep = os.path.join(out, "notes.txt")
    open(keep, "w").write("mine")
    removed = []
    real_unlink, real_rmtree = os.unlink, shutil.rmtree
    def unlink(path, **kw):  # a spy: records the removal, then removes (rmtree's own calls pass dir_fd)
        if not kw:
            removed.append(os.path.relpath(path, out))
        real_unlink(path, **kw)

    monkeypatch.setattr(identity.os, "unlink", unlink)
    monkeypatch.setattr(identity.shutil, "rmtree",
                        lambda p, **kw: (removed.append(os.path.relpath(p, out) + "/"), real_rmtree(p, **kw)))
    identity.replace_run(out)
    assert removed[:2] == ["done", "record.json"] and removed[-1] == "identity.json"
    assert {"clip_adapter/", "generator/", "log.txt", "config.yaml", "args.json"} <= set(removed)
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_checkpoints_load_weights_only_and_restore_the_random_state():
    """Checkpoint contents are tensors, numbers, strings and containers (``torch.load(weights_only=True)``);
    the saved RNG states restore the python, numpy and torch streams."""
    import io
    import random

    import numpy as np

    from dassl.utils.torchtools import rng_from_tensors, rng_to_tensors

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)  # a cached gaussian in numpy's state
    state = rng_to_tensors()
    buf = io.BytesIO()
    torch.save({"rng_state": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["rng_state"]
    want = (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    rng_from_tensors(loaded)
    assert (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist()) == want


def test_checkpoint_files_kept_are_best_and_last_or_as_asked(root, tmp_path):
    run_cli(argv(root, str(tmp_path / "default"), epochs=3))
    run_cli(argv(root, str(tmp_path / "every2"), epochs=5, extra=["TRAIN.CHECKPOINT_FREQ", "2"]))
    for model in ("clip_adapter", "generator"):
        assert sorted(os.listdir(tmp_path / "default" / model)) == ["checkpoint", "model-best.pth.tar",
                                                                     "model.pth.tar-3"]
        assert sorted(os.listdir(tmp_path / "every2" / model)) == ["checkpoint", "model-best.pth.tar",
                                                                    "model.pth.tar-2", "model.pth.tar-4",
                                                                    "model.pth.tar-5"]
    # killed after writing the generator's epoch 3, before its pointer and before epoch 2's file was removed:
    # the resumed run (from epoch 3, as the first model's pointer says) keeps epoch 3's files, removes epoch 2's
    gen = tmp_path / "default" / "generator"
    shutil.copy(gen / "model.pth.tar-3", gen / "model.pth.tar-2")
    (gen / "checkpoint").write_text("model.pth.tar-2\n")
    for name in ("done", "record.json"):
        os.unlink(tmp_path / "default" / name)
    run_cli(argv(root, str(tmp_path / "default"), epochs=3))
    assert sorted(os.listdir(gen)) == ["checkpoint", "model-best.pth.tar", "model.pth.tar-3"]
    assert (gen / "checkpoint").read_text() == "model.pth.tar-3\n"
    ckpt = torch.load(tmp_path / "default" / "clip_adapter" / "model.pth.tar-3", weights_only=True)
    assert ckpt["fingerprint"] == record(str(tmp_path / "default"))["fingerprint"]
    # docs/failures.md: 24·D² bytes of tensors per epoch's files (3 D x D float32 matrices and their momentum)
    dim = ckpt["state_dict"]["fc_i"].shape[0]
    total = 0
    for model in ("clip_adapter", "generator"):
        c = torch.load(tmp_path / "default" / model / "model.pth.tar-3", weights_only=True)
        tensors = list(c["state_dict"].values()) + [v for s in c["optimizer"]["state"].values() for v in s.values()
                                                    if torch.is_tensor(v) and v.dim() > 0]
        total += sum(t.numel() * t.element_size() for t in tensors)
    assert total == 24 * dim * dim


# ------------------------------------------------------------------------------------------ drivers
def _sweep(root: str, out: str, *flags: str, epochs: str = "1", shots: str = "2",
           launcher: str = "inprocess") -> list[str]:
    return ["--root", root, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1", "--domains", "sketch",
            "--lambda2", "1000", "--shots", shots, "--epochs", epochs, "--output-root", out, "--eval-root",
            out + "_eval", "--ood", "DTD", "--launcher", launcher, *flags, "--", *TINY, "DATALOADER.TRAIN_X.BATCH_SIZE",
            "8"]


def test_driver_plans_by_fingerprint(root, tmp_path, capsys):
    """A smoke run in a real run's directory is never counted as done: the driver stops with one line naming the
    differing keys, ``--dry-run`` lists it as changed, ``--rerun-changed`` replaces it."""
    from launch import setup2

    out = str(tmp_path / "out")
    assert setup2.main(_sweep(root, out), trainer="CRoFT") == 0
    smoke = record(next(dp for dp, _, fs in os.walk(out) if "done" in fs))
    capsys.readouterr()
    assert setup2.main(_sweep(root, out, epochs="2"), trainer="CRoFT") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run of another configuration (OPTIM.MAX_EPOCH: 1 -> 2)" in err[0]
    assert setup2.main(_sweep(root, out, "--dry-run", epochs="2"), trainer="CRoFT") == 0
    listed = capsys.readouterr().out
    assert "1 runs planned, 0 already done, 1 to run" in listed
    assert "[changed: OPTIM.MAX_EPOCH: 1 -> 2] CRoFT/PACS_rn50_ep30_l1-15_l2-1000" in listed
    assert setup2.main(_sweep(root, out, "--rerun-changed", epochs="2"), trainer="CRoFT") == 0
    run_dir = next(dp for dp, _, fs in os.walk(out) if "done" in fs)
    real = record(run_dir)
    assert real["fingerprint"] != smoke["fingerprint"] and real["config"]["OPTIM"]["MAX_EPOCH"] == 2
    capsys.readouterr()
    assert setup2.main(_sweep(root, out, epochs="2"), trainer="CRoFT") == 0
    assert "1 runs planned, 1 already done, 0 to run" in capsys.readouterr().out
    with open(os.path.join(out, "sweeps", "setup2_train.json")) as f:
        (entry,) = json.load(f)["jobs"]
    assert entry["fingerprint"] == real["fingerprint"] and entry["plan"]["fingerprint"] is None  # not the preset's
    assert "OPTIM.MAX_EPOCH: 30 -> 2" in entry["plan"]["differences"]


def test_evaluation_runs_fingerprint_their_model(root, tmp_path, capsys):
    """An evaluation of a 2-shot model is not the evaluation of the 16-shot model a real command plans."""
    from launch import setup2
    from synthetic_openset import write_all_openset

    write_all_openset(root)
    out = str(tmp_path / "out")
    assert setup2.main(_sweep(root, out), trainer="CRoFT") == 0
    assert setup2.main(_sweep(root, out), trainer="CRoFT", evaluate=True) == 0
    ev = next(dp for dp, _, fs in os.walk(out + "_eval") if "done" in fs)
    rec = record(ev)
    assert rec["identity"]["model"]["fingerprint"] == record(rec["model_dir"])["fingerprint"]
    assert rec["identity"]["model"]["fingerprinted"]["DATASET"]["NUM_SHOTS"] == 2
    capsys.readouterr()
    assert setup2.main(_sweep(root, out, "--dry-run", shots="16"), trainer="CRoFT", evaluate=True) == 0
    listed = capsys.readouterr().out
    assert "[changed: model.DATASET.NUM_SHOTS: 2 -> 16]" in listed and "[done]" not in listed


def test_collectors_label_a_run_outside_the_preset_plan(root, tmp_path):
    """A driver's smoke run (2 shots, 1 epoch) is a row of its own, labelled not official with its shots and
    why; a manifest run is labelled official only when its fingerprint is the preset's for that directory."""
    from launch import collect, setup2

    out = str(tmp_path / "out")
    assert setup2.main(_sweep(root, out), trainer="CRoFT") == 0
    text = collect.collect_oodg(out, str(tmp_path / "t.csv"), select="val")
    lines = text.splitlines()
    assert "> preset: not official (1 runs)" in lines
    (row,) = [ln for ln in lines if ln.startswith("| CRoFT")]
    tag = row.split(" | ")[0][len("| CRoFT ("):-1]  # the row's method: CRoFT (not official <tag>)
    assert tag.startswith("not official ") and len(tag) == len("not official ") + 6
    (why,) = [ln for ln in lines if ln.startswith(f"> {tag}: ")]  # why, named in the header
    assert why.startswith(f"> {tag}: OPTIM.MAX_EPOCH: 30 -> 1; ") and "MODEL.BACKBONE.NAME: 'RN50' -> 'tiny-rn-test'" in why
    assert "| rn50_ep30_l1-15_l2-1000_r0.2_rt0.5_g0_shots2 |" in row
    path = os.path.join(out, "sweeps", "setup2_train.json")
    with open(path) as f:
        manifest = json.load(f)
    (entry,) = manifest["jobs"]
    rec = record(entry["output_dir"])
    assert collect.plan_labels(dict(entry, plan=dict(entry["plan"], fingerprint=rec["fingerprint"])), rec)["plan"] \
        == "official"
    moved = collect.plan_labels(dict(entry, fingerprint="0" * 16), rec)
    assert moved["plan"] == "not official" and moved["plan_note"][1] == "changed since planned"
    assert moved["method"] == f"CRoFT ({moved['plan_note'][0]})"


def _recording_python(tmp_path) -> tuple[str, str]:
    """A PYTHON for the shell drivers that runs ``-m launch.official`` and records each train.py command line."""
    log = str(tmp_path / "calls.jsonl")
    path = str(tmp_path / "python")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nif [ \"$1\" = -m ]; then exec {sys.executable} \"$@\"; fi\n"
                f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\" >> {log}\n")
    os.chmod(path, 0o755)
    return path, log


def test_shell_and_python_drivers_plan_the_same_runs(root, tmp_path):
    """``croft_pacs.sh`` and ``run_setup2.py`` name the same directory and the same fingerprint for each run."""
    from launch import setup2
    from launch.runid import Planner

    python, calls = _recording_python(tmp_path)
    out = str(tmp_path / "output")
    env = dict(os.environ, DATA=root, OUTPUT_ROOT=out, PYTHON=python)
    res = subprocess.run(["bash", "scripts/CRoFT/croft_pacs.sh", "PACS", "rn50_ep30", "1", "16", "10"], cwd=COOP,
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    shell = [json.loads(line) for line in open(calls)]
    assert [a[0] for a in shell] == ["train.py"] * 4
    _, jobs = setup2.plan(["--root", root, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1",
                           "--output-root", out], trainer="CRoFT")
    planner = Planner()
    planned = {d: i["fingerprint"] for j in jobs for d, i in planner.identities(j.argv).items()}
    for cmd in shell:
        ((d, ident),) = planner.identities(cmd[1:]).items()
        assert "_l1-15_l2-10_r0.2_rt0.5_g0/" in d and planned[d] == ident["fingerprint"], d


@pytest.mark.slow
def test_shell_and_python_runs_make_one_row(root, tmp_path):
    """The shell driver trains all four held-out domains, the Python driver three of them (done: skipped, same
    runs) plus λ2 10; ``--select val`` gives one CRoFT row over the four domains (issue: two rows, Avg "–")."""
    from launch import collect, setup2

    out = str(tmp_path / "output")
    tiny = [*TINY, "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "8"]
    env = dict(os.environ, DATA=root, OUTPUT_ROOT=out, PYTHON=sys.executable, CROFT_NO_PROGRESS="1")
    res = subprocess.run(["bash", "scripts/CRoFT/croft_pacs.sh", "PACS", "rn50_ep30", "1", "2", "1000", *tiny],
                         cwd=COOP, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    code = setup2.main(["--root", root, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1", "--domains",
                        "sketch", "photo", "cartoon", "--lambda2", "1000", "10", "--shots", "2", "--epochs", "1",
                        "--output-root", out, "--launcher", "inprocess", "--", *TINY,
                        "DATALOADER.TRAIN_X.BATCH_SIZE", "8"], trainer="CRoFT")
    assert code == 0
    text = collect.collect_oodg(out, str(tmp_path / "t.csv"), select="val")
    rows = [ln for ln in text.splitlines() if ln.startswith("| CRoFT")]
    assert len(rows) == 1, text
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[-1] == "1" and "–" not in cells  # every domain, the average and one complete seed
