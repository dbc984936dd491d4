"""Stacked (vectorised) CRoFT λ-sweeps: one run on K x D x D weights equals K separate runs.

Expected values are the separate runs themselves: the core step against K calls of ``croft_train_step``
(float64, every fix and EDR variant), ``train.py --member`` and the ``--stack`` sweep driver against the same
runs trained one by one (checkpoints, optimiser state, records, logs).
"""
from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from helpers import COOP, TINY, run_cli
from synthetic import write_lodo_tree

FIXES = ("fix_edr_consistent", "fix_separate_updates", "fix_fresh_activations", "fix_edr_temperature")
VARIANTS = [("A", "mean_sumsq", True), ("B", "sum_meansq", True), ("A", "sum_meansq", False)]


def _steps(stack, lambdas, opts_kw, X, T, y, steps=3):
    from trainers.croft_core import Adapter, CRoFTOptions, OODImgGen, croft_train_step

    dim = X.shape[1]
    a, g = Adapter(dim, dtype=X.dtype, stack=stack), OODImgGen(dim, dtype=X.dtype, stack=stack)
    oa = torch.optim.SGD(a.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    og = torch.optim.SGD(g.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    l1, l2 = lambdas
    if stack:
        l1, l2 = torch.tensor(l1, dtype=X.dtype), torch.tensor(l2, dtype=X.dtype)
    opts = CRoFTOptions(lambda1=l1, lambda2=l2, gen_step=2, **opts_kw)
    stats = [croft_train_step(a, g, X, T, y, oa, og, opts, 100.0) for _ in range(steps)]
    return a, g, oa, stats


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_stacked_step_equals_separate_steps(variant):
    branch, reduction, wccf = variant
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(12, 16, generator=gen, dtype=torch.float64)
    T = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (12,), generator=gen)
    lam1, lam2 = [0.5, 1.0, 15.0], [0.0, 5.0, 1000.0]
    for fixes in itertools.product([False, True], repeat=len(FIXES)):
        kw = dict(zip(FIXES, fixes), edr_branch=branch, edr_reduction=reduction, wccf=wccf)
        a, g, oa, stats = _steps(3, (lam1, lam2), kw, X, T, y)
        for k in range(3):
            sa, sg, soa, sstats = _steps(None, (lam1[k], lam2[k]), kw, X, T, y)
            for name in ("fc_i", "fc_t"):
                torch.testing.assert_close(getattr(a, name)[k], getattr(sa, name), rtol=0, atol=1e-10)
            torch.testing.assert_close(g.img2img_cov[k], sg.img2img_cov, rtol=0, atol=1e-10)
            buf, sbuf = oa.state[a.fc_i]["momentum_buffer"][k], soa.state[sa.fc_i]["momentum_buffer"]
            torch.testing.assert_close(buf, sbuf, rtol=1e-9, atol=1e-9)
            for step, sep in zip(stats, sstats):
                for key in ("loss", "ce", "edr", "L1", "L2", "acc"):
                    assert step[key][k] == pytest.approx(sep[key], rel=1e-9, abs=1e-9), (fixes, key)
                assert [v[k] for v in step["gen_loss"]] == pytest.approx(sep["gen_loss"], rel=1e-9)


# ------------------------------------------------------------------------------------------------ train.py
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("stack_data"))
    write_lodo_tree(path, per_class=6)
    return path


def _base(root):
    return ["--root", root, "--seed", "1", "--trainer", "CRoFT", "--dataset-config-file",
            "configs/datasets/PACS.yaml", "--config-file", "configs/trainers/CRoFT/rn50_ep30.yaml"]


def _opts(cached, tmp_path):
    extra = [*TINY, "TEST_ENV", "sketch", "OPTIM.MAX_EPOCH", "3", "DATASET.NUM_SHOTS", "4",
             "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "VERBOSE", "False"]  # default keys: best + rolling last
    if cached:
        extra += ["FEATURE_CACHE.ENABLED", "True", "FEATURE_CACHE.DIR", str(tmp_path / "features"),
                  "FEATURE_CACHE.TRAIN_VIEWS", "2"]
    return extra


MEMBERS = [("lambda2", "0.0"), ("lambda2", "1000.0"), ("lambda1", "0.5")]


def assert_same_runs(a: str, b: str, atol: float = 1e-5) -> None:
    """Two run directories hold the same training (checkpoints to atol, optimiser state, records, log lines)."""
    for model in ("clip_adapter", "generator"):
        names = sorted(f for f in os.listdir(os.path.join(a, model)) if f.startswith("model"))
        assert names and names == sorted(f for f in os.listdir(os.path.join(b, model)) if f.startswith("model"))
        for f in names:
            ca = torch.load(os.path.join(a, model, f), weights_only=False)
            cb = torch.load(os.path.join(b, model, f), weights_only=False)
            assert ca["epoch"] == cb["epoch"] and ca["best_epoch"] == cb["best_epoch"]
            for key, val in ca["state_dict"].items():
                torch.testing.assert_close(cb["state_dict"][key], val, rtol=0, atol=atol)
            sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
            assert sorted(sa) == sorted(sb) and sa
            for i in sa:
                torch.testing.assert_close(sb[i]["momentum_buffer"], sa[i]["momentum_buffer"], rtol=1e-4, atol=atol)
            assert ca["optimizer"]["param_groups"][0]["lr"] == cb["optimizer"]["param_groups"][0]["lr"]
            assert ca["scheduler"] == cb["scheduler"]
    ra, rb = (json.load(open(os.path.join(d, "record.json"))) for d in (a, b))
    assert ra["metrics"] == rb["metrics"] and ra["val_history"] == rb["val_history"]
    assert ra["best_epoch"] == rb["best_epoch"] and os.path.isfile(os.path.join(b, "done"))
    la, lb = (_progress(os.path.join(d, "log.txt")) for d in (a, b))
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert x.keys() == y.keys()
        assert all(v == pytest.approx(y[k], rel=1e-3, abs=1e-3) for k, v in x.items())


def _progress(path):
    """The loss numbers of each Dassl progress line: ``name value (avg)`` pairs."""
    import re

    rows = []
    for line in open(path, encoding="utf-8"):
        if line.startswith("epoch ["):
            rows.append({m.group(1): float(m.group(2))
                         for m in re.finditer(r"\b(loss|acc|ce|edr_L2|gen) ([-\d.e+na]+) \(", line)})
    return rows


@pytest.mark.parametrize("cached", [False, True], ids=["augment", "feature-cache"])
def test_member_stack_equals_separate_runs(root, tmp_path, cached):
    for key, val in MEMBERS:
        run_cli(_base(root) + ["--output-dir", str(tmp_path / f"sep_{key}{val}"), *_opts(cached, tmp_path),
                               f"TRAINER.CRoFT.{key}", val])
    members = [x for key, val in MEMBERS for x in ("--member", str(tmp_path / f"stk_{key}{val}"),
                                                    f"TRAINER.CRoFT.{key}", val)]
    out = run_cli(_base(root) + members + ["--", *_opts(cached, tmp_path)])
    assert [r["stack"]["index"] for r in out["stack"]] == [0, 1, 2]
    for key, val in MEMBERS:
        assert_same_runs(str(tmp_path / f"sep_{key}{val}"), str(tmp_path / f"stk_{key}{val}"))
    # the members really differ: λ changes the weights
    w = [torch.load(tmp_path / f"stk_{k}{v}" / "clip_adapter" / "model.pth.tar-3", weights_only=False)
         ["state_dict"]["fc_i"] for k, v in MEMBERS]
    assert not torch.allclose(w[0], w[1], atol=1e-4)


def test_members_differing_elsewhere_run_one_by_one(root, tmp_path, capsys):
    members = ["--member", str(tmp_path / "a"), "OPTIM.LR", "0.002",
               "--member", str(tmp_path / "b"), "OPTIM.LR", "0.01"]
    run_cli(_base(root) + members + ["--", *_opts(False, tmp_path)])
    assert "trained one after another (members differ in OPTIM.LR" in capsys.readouterr().out
    run_cli(_base(root) + ["--output-dir", str(tmp_path / "ref"), *_opts(False, tmp_path), "OPTIM.LR", "0.01"])
    assert_same_runs(str(tmp_path / "ref"), str(tmp_path / "b"), atol=0)  # bitwise: run alone, same process


def test_non_finite_member_stops_alone(root, tmp_path, capsys):
    import train

    members = ["--member", str(tmp_path / "ok"), "TRAINER.CRoFT.lambda2", "1.0",
               "--member", str(tmp_path / "bad"), "TRAINER.CRoFT.lambda2", "1e38"]
    cwd = os.getcwd()
    os.chdir(COOP)
    try:
        code = train.cli(_base(root) + members + ["--", *_opts(False, tmp_path)])
    finally:
        os.chdir(cwd)
    assert code == 3
    assert "1 of 2 stacked runs stopped on non-finite values" in capsys.readouterr().err
    assert os.path.isfile(tmp_path / "ok" / "done")
    assert not os.path.exists(tmp_path / "bad" / "done") and not os.path.exists(tmp_path / "bad" / "record.json")
    assert "error: non-finite values in epoch 1" in (tmp_path / "bad" / "log.txt").read_text()


def test_member_flag_errors(root, tmp_path):
    import train
    from dassl.utils.errors import ConfigError

    for bad in (["--member", str(tmp_path / "a"), "OPTIM.LR"],
                ["--output-dir", str(tmp_path / "o"), "--member", str(tmp_path / "a")],
                ["--member", str(tmp_path / "a"), "--member", str(tmp_path / "a")]):
        with pytest.raises(ConfigError):
            run_cli(_base(root) + bad + ["--", *_opts(False, tmp_path)])
    assert not os.path.exists(tmp_path / "a")
    del train


# ------------------------------------------------------------------------------------------------ sweep driver
def test_stack_sweep_equals_plain_sweep(root, tmp_path, capsys):
    from launch import setup2
    from launch.sweep import read_manifests

    def sweep(out, *flags):
        common = ["--root", root, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1", "--domains",
                  "sketch", "photo", "--lambda2", "1", "10", "100", "--epochs", "2", "--shots", "2",
                  "--output-root", str(out), "--launcher", "inprocess", *flags, "--", *TINY,
                  "DATALOADER.TRAIN_X.BATCH_SIZE", "4"]
        assert setup2.main(common, trainer="CRoFT") == 0
        return common

    sweep(tmp_path / "plain")
    capsys.readouterr()
    common = sweep(tmp_path / "stacked", "--stack")
    assert "--stack: 6 runs in 2 jobs" in capsys.readouterr().out
    runs = sorted(os.path.relpath(dp, tmp_path / "plain") for dp, _, fs in os.walk(tmp_path / "plain") if "done" in fs)
    assert len(runs) == 6
    assert runs == sorted(os.path.relpath(dp, tmp_path / "stacked")
                          for dp, _, fs in os.walk(tmp_path / "stacked") if "done" in fs)
    for rel in runs:
        assert_same_runs(str(tmp_path / "plain" / rel), str(tmp_path / "stacked" / rel))
    listed = {j["output_dir"] for j in read_manifests(str(tmp_path / "stacked"))}
    assert {os.path.relpath(d, tmp_path / "stacked") for d in listed} == set(runs)  # every member, by name
    # restartable: a finished member is left alone; only the missing one is trained again
    gone = tmp_path / "stacked" / runs[0]
    os.remove(gone / "done")
    assert setup2.main(common, trainer="CRoFT") == 0
    out = capsys.readouterr().out
    assert "6 runs planned, 5 already done, 1 to run" in out and "--stack:" not in out
    assert os.path.isfile(gone / "done")


@pytest.mark.parametrize("driver,argv", [
    ("setup1", ["--seeds", "1", "2", "--preset", "grid"]),
    ("setup2", ["--datasets", "PACS", "VLCS", "--seeds", "1", "--preset", "grid"]),  # (sketch is no VLCS domain)
])
def test_stacked_plans_reproduce_each_runs_config(driver, argv, tmp_path):
    """Every member of a planned stack resolves to exactly the config of its own planned run."""
    import importlib

    import train
    from dassl.config import cfg_to_dict
    from dassl.engine.stacked import member_args, stack_blocker
    from launch.sweep import stack_jobs

    module = importlib.import_module(f"launch.{driver}")
    _, jobs = module.plan(["--root", str(tmp_path), *argv], trainer="CRoFT")
    by_dir = {j.output_dir: j for j in jobs}
    stacks = [j for j in stack_jobs(jobs) if j.parts]
    assert stacks and sum(len(j.parts) for j in stacks) == len(jobs)
    for job in stacks[:: max(1, len(stacks) // 4)]:
        members = member_args(train.get_parser().parse_args(job.argv))
        assert [m.output_dir for m in members] == job.run_dirs()
        cfgs = [train.setup_cfg(m) for m in members]
        assert stack_blocker(cfgs) is None
        for member, cfg in zip(members, cfgs):
            alone = train.setup_cfg(train.get_parser().parse_args(by_dir[member.output_dir].argv))
            assert cfg_to_dict(cfg) == cfg_to_dict(alone)
