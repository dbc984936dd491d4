"""Driver commands: ``--then-eval`` (train, then evaluate, in one command and one set of workers) gives the records
of the two commands; ``--timings`` writes where the seconds went; ``python -m launch.setup1|setup2`` run the
drivers (``--eval``: the evaluation driver)."""
from __future__ import annotations

import json
import os
import runpy
import sys

import pytest

from synthetic import write_lodo_tree
from synthetic_openset import write_all_openset

TINY = ["--", "MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "DEVICE", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("drv") / "data")
    write_lodo_tree(root, per_class=3)
    write_all_openset(root)
    return root


def _flags(data: str, base, launcher: str) -> list[str]:
    return ["--root", data, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1", "--domains", "sketch",
            "--lambda2", "1", "--epochs", "1", "--shots", "2", "--output-root", str(base / "output"),
            "--eval-root", str(base / "eval"), "--ood", "DTD", "Caltech101", "--launcher", launcher]


def _comparable(root) -> dict:
    """Every record under ``root`` by its path below ``root``: metrics, config (without OUTPUT_DIR), fingerprint."""
    out = {}
    for dirpath, _, files in os.walk(root):
        if "record.json" in files:
            with open(os.path.join(dirpath, "record.json")) as f:
                rec = json.load(f)
            rec["config"].pop("OUTPUT_DIR")
            out[os.path.relpath(dirpath, root)] = {k: rec[k] for k in ("metrics", "config", "mode", "best_epoch")
                                                   if k in rec}
    return out


def test_then_eval_equals_two_commands(data, tmp_path, capsys):
    from launch import setup2

    two, one = tmp_path / "two", tmp_path / "one"
    assert setup2.main(_flags(data, two, "inprocess") + TINY, trainer="CRoFT") == 0
    assert setup2.main(_flags(data, two, "inprocess") + TINY, trainer="CRoFT", evaluate=True) == 0
    timings = tmp_path / "t.json"
    assert setup2.main(_flags(data, one, "inprocess") + ["--then-eval", "--timings", str(timings)] + TINY,
                       trainer="CRoFT") == 0
    out = capsys.readouterr().out
    for root in ("output", "eval"):
        expected, got = _comparable(two / root), _comparable(one / root)
        assert len(expected) == (1 if root == "output" else 2)
        assert got == expected
    # both manifests written, as by the two commands
    assert sorted(os.listdir(one / "output" / "sweeps")) == ["setup2_train.json"]
    assert sorted(os.listdir(one / "eval" / "sweeps")) == ["setup2_eval.json"]
    t = json.loads(timings.read_text())
    assert [p["phase"] for p in t["phases"]] == ["train", "eval"]
    assert [len(p["jobs"]) for p in t["phases"]] == [1, 1]  # one training run, one evaluation pass (2 open sets)
    assert t["started"] <= t["planned"] <= t["phases"][0]["start"] <= t["phases"][1]["start"] <= t["ended"]
    assert "timings: " in out and "train " in out and "eval " in out


def test_then_eval_is_refused_by_the_evaluation_driver(data, tmp_path, capsys):
    from launch import setup2

    assert setup2.main(_flags(data, tmp_path, "inprocess") + ["--then-eval", "--dry-run"], evaluate=True) == 2
    assert "--then-eval belongs to the training drivers" in capsys.readouterr().err


@pytest.mark.slow
def test_then_eval_runs_both_phases_in_one_worker(data, tmp_path):
    from launch import setup2

    timings = tmp_path / "t.json"
    assert setup2.main(_flags(data, tmp_path, "workers") + ["--jobs", "1", "--then-eval", "--timings",
                                                            str(timings)] + TINY, trainer="CRoFT") == 0
    phases = json.loads(timings.read_text())["phases"]
    workers = {j["worker"] for p in phases for j in p["jobs"]}
    assert [len(p["jobs"]) for p in phases] == [1, 1] and len(workers) == 1  # no second start-up
    assert len(_comparable(tmp_path / "eval")) == 2


@pytest.mark.parametrize("module,evaluate", [("setup2", False), ("setup2", True), ("setup1", False),
                                             ("setup1", True)])
def test_python_m_runs_the_driver(module, evaluate, tmp_path, monkeypatch, capsys):
    flags = ["--root", str(tmp_path / "data"), "--seeds", "1", "--lambda2", "1", "--dry-run",
             "--output-root", str(tmp_path / "o"), "--eval-root", str(tmp_path / "e")]
    flags += (["--datasets", "PACS", "--domains", "sketch", "--cfgs", "rn50_ep30", "--ood", "DTD"]
              if module == "setup2" else ["--shots", "16", "--lambda1", "1", "--test-sets", "test_id"])
    monkeypatch.setattr(sys, "argv", [module] + (["--eval"] if evaluate else []) + flags)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, f"launch.{module}", raising=False)  # runpy runs it as __main__, fresh
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"launch.{module}", run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "1 runs planned, 0 already done, 1 to run" in out
    assert ("--eval-only" in out) is evaluate  # the evaluation driver plans evaluation runs
    assert str(tmp_path / ("e" if evaluate else "o")) in out


def test_drivers_import_no_torch_before_they_start_workers():
    """A driver module loads only light code (its workers import torch & co. while it plans)."""
    import subprocess

    from helpers import COOP

    code = ("import sys\nimport launch.setup1, launch.setup2\nfrom launch.launchers import launcher_names\n"
            "launcher_names()\nheavy = sorted(m for m in ('torch', 'torchvision', 'open_clip', 'numpy') if m in "
            "sys.modules)\nprint(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=COOP, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_workers_start_before_the_plan_is_resolved(data, tmp_path, monkeypatch):
    """The driver starts its launcher (the workers) before it plans and resolves the runs."""
    from launch import launchers, setup2, sweep

    order = []

    class Probe(launchers.InProcessLauncher):
        def start(self) -> None:
            order.append("start")

    real_plan, real_resolve = sweep.plan_jobs, sweep.resolve_plan
    monkeypatch.setattr(sweep, "plan_jobs", lambda *a, **k: order.append("plan") or real_plan(*a, **k))
    monkeypatch.setattr(sweep, "resolve_plan", lambda *a, **k: order.append("resolve") or real_resolve(*a, **k))
    monkeypatch.setitem(launchers.LAUNCHERS, "probe", Probe)
    assert setup2.main(_flags(data, tmp_path, "probe") + ["--then-eval"] + TINY, trainer="CRoFT") == 0
    assert order == ["start", "plan", "plan", "resolve", "resolve"]
    assert len(_comparable(tmp_path / "eval")) == 2


def test_a_lost_planning_worker_leaves_the_planning_to_the_driver(data, tmp_path, monkeypatch, capsys):
    """A launcher whose worker dies before it answers a planning call: the driver plans (and keeps its books)
    itself, one note each time, and the runs are made."""
    from launch import launchers, setup2

    class Lost(launchers.InProcessLauncher):
        def call(self, target: str, *args) -> None:
            raise launchers.WorkerLost(f"worker 1 died before answering {target} (killed by SIGKILL)")

    monkeypatch.setitem(launchers.LAUNCHERS, "lost", Lost)
    assert setup2.main(_flags(data, tmp_path, "lost") + ["--then-eval"] + TINY, trainer="CRoFT") == 0
    err = capsys.readouterr().err
    assert err.count("the driver plans by itself") == 3  # the plan, then the books of each phase
    assert "launch.sweep:plan_phases_of" in err and "launch.sweep:prepare_phase" in err
    assert len(_comparable(tmp_path / "eval")) == 2


def test_a_driver_plans_in_its_worker_and_never_imports_torch(data, tmp_path):
    """With the ``workers`` launcher the plan and the books are made in the worker: the driver process never
    imports torch or open_clip, and its workers end without leaving a semaphore behind."""
    import subprocess

    from helpers import COOP

    argv = _flags(data, tmp_path, "workers") + ["--jobs", "1", "--then-eval"] + TINY
    code = (f"import sys\nfrom launch import setup2\nrc = setup2.main({argv!r}, trainer='CRoFT')\n"
            "print(rc, sorted(m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=COOP, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr
    assert "leaked semaphore" not in proc.stderr and "Traceback" not in proc.stderr
    assert "runs planned" in proc.stdout and len(_comparable(tmp_path / "eval")) == 2


def test_scoring_keys_given_to_the_evaluation_alone_name_the_trained_model(data, tmp_path, capsys):
    """``--eval -- TEST.OOD_SCORES ...`` after a training command without it: the evaluations name the trained
    model (``launch.runid.evaluated_model``), so once run they are done; a key the weights depend on (here the
    epochs) still makes the evaluations another configuration, the model's key named."""
    from launch import setup2

    flags = _flags(data, tmp_path, "inprocess")
    scores = ["TEST.OOD_SCORES", "['energy', 'mcm']"]
    assert setup2.main(flags + TINY, trainer="CRoFT") == 0
    assert setup2.main(flags + TINY + scores, trainer="CRoFT", evaluate=True) == 0
    capsys.readouterr()
    assert setup2.main(flags + ["--dry-run"] + TINY + scores, trainer="CRoFT", evaluate=True) == 0
    out = capsys.readouterr().out
    assert "2 runs planned, 2 already done, 0 to run" in out and "[changed" not in out
    epochs = [a if a != "1" or flags[i - 1] != "--epochs" else "2" for i, a in enumerate(flags)]
    assert setup2.main(epochs + ["--dry-run"] + TINY + scores, trainer="CRoFT", evaluate=True) == 0
    out = capsys.readouterr().out
    assert "model.OPTIM.MAX_EPOCH: 1 -> 2" in out
