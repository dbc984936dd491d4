"""Launchers: persistent workers give the records of one process per run; a killed worker fails only its job."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import COOP
from synthetic import write_lodo_tree

OPTS = ["MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DEVICE", "cpu"]


def _jobs(data: str, out: str, names_epochs: list[tuple[str, int, int]]) -> list:
    from launch.sweep import Job

    base = ["--root", data, "--trainer", "CRoFT", "--dataset-config-file", os.path.join(COOP, "configs", "datasets",
            "PACS.yaml"), "--config-file", os.path.join(COOP, "configs", "trainers", "CRoFT", "rn50_ep30.yaml")]
    return [Job(name, os.path.join(out, name), [*base, "--seed", str(seed), "--output-dir", os.path.join(out, name),
                                                *OPTS, "OPTIM.MAX_EPOCH", str(epochs), "DATASET.NUM_SHOTS", "2",
                                                "TEST_ENV", "sketch"])
            for name, epochs, seed in names_epochs]


def _comparable(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "record.json")) as f:
        rec = json.load(f)
    rec["config"].pop("OUTPUT_DIR")
    rec["args"].pop("output_dir")
    return {k: rec[k] for k in ("metrics", "config", "args", "seed", "best_epoch")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("wdata") / "d")
    write_lodo_tree(root, per_class=3)
    return root


@pytest.mark.slow
def test_workers_records_equal_one_process_per_run(data, tmp_path):
    from launch.sweep import run_jobs

    spec = [("a", 2, 1), ("b", 1, 2), ("c", 2, 3), ("d", 1, 1), ("e", 2, 2)]  # repeated seeds: CLIP memo hits
    assert run_jobs(_jobs(data, str(tmp_path / "proc"), spec), launcher="process") == 0
    assert run_jobs(_jobs(data, str(tmp_path / "work"), spec), launcher="workers", num_workers=2) == 0
    for name, _, _ in spec:
        proc, work = _comparable(str(tmp_path / "proc" / name)), _comparable(str(tmp_path / "work" / name))
        assert proc["metrics"]["test"]["accuracy"] >= 0
        assert proc == work
        assert os.path.isfile(tmp_path / "work" / name / "log.txt")


def _kill_worker_when(path: str, stop: threading.Event) -> None:
    """Wait for ``path`` (the victim job's log) and SIGKILL the worker process running it (the only one)."""
    while not stop.is_set():
        if os.path.exists(path):
            for child in mp.active_children():
                if child.name.startswith("croft-worker"):
                    os.kill(child.pid, signal.SIGKILL)
            return
        time.sleep(0.05)


@pytest.mark.parametrize("retry", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_killed_worker_fails_only_its_job(data, tmp_path, capsys, retry):
    from launch.sweep import run_jobs

    jobs = _jobs(data, str(tmp_path), [("victim", 40, 1), ("next", 1, 1)])
    stop = threading.Event()
    killer = threading.Thread(target=_kill_worker_when, args=(str(tmp_path / "victim" / "log.txt"), stop))
    killer.start()
    try:
        failures = run_jobs(jobs, launcher="workers", num_workers=1, retry=retry)
    finally:
        stop.set()
        killer.join()
    err = capsys.readouterr().err
    assert "killed by SIGKILL" in err
    assert jobs[1].done()  # the replacement worker ran the next job
    if retry:
        assert failures == 0 and jobs[0].done() and "retrying victim" in err
    else:
        assert failures == 1 and not jobs[0].done() and "FAILED victim: worker died (killed by SIGKILL)" in err


def test_workers_die_with_the_driver(tmp_path):
    script = ("import multiprocessing as mp, sys, time\n"
              f"sys.path.insert(0, {COOP!r})\n"
              "from launch.workers import _Worker\n"
              "if __name__ == '__main__':\n"
              "    w = _Worker(mp.get_context('spawn'), 0, None, 1, True)\n"
              "    print(w.process.pid, flush=True)\n"
              "    time.sleep(600)\n")
    path = tmp_path / "driver.py"
    path.write_text(script)
    driver = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(driver.stdout.readline())
        time.sleep(1.0)
        driver.kill()
        driver.wait()
        deadline = time.time() + 30
        while time.time() < deadline and _alive(worker_pid):
            time.sleep(0.1)
        assert not _alive(worker_pid)
    finally:
        if driver.poll() is None:
            driver.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_unknown_launcher_names_the_choices():
    from launch.launchers import get_launcher

    with pytest.raises(ValueError, match="unknown launcher 'nope' \\(choose from .*inprocess.*process.*workers"):
        get_launcher("nope")


def test_worker_memo_reads_split_lists_once(data, monkeypatch):
    import datasets.lodo as lodo
    from dassl.data.datasets import DATASET_REGISTRY
    from dassl.utils import resources

    import train

    cfg = train.setup_cfg(train.get_parser().parse_args(
        ["--root", data, "--trainer", "CRoFT", "--dataset-config-file",
         os.path.join(COOP, "configs", "datasets", "PACS.yaml"), "TEST_ENV", "sketch"]))
    calls = []
    real = lodo.read_json
    monkeypatch.setattr(lodo, "read_json", lambda p: calls.append(p) or real(p))
    resources.enable()
    try:
        first, second = DATASET_REGISTRY.get("PACS")(cfg), DATASET_REGISTRY.get("PACS")(cfg)
    finally:
        resources.enable(False)
    assert len(calls) == 1
    assert [d.impath for d in first.test] == [d.impath for d in second.test] and len(first.test) == 9
    assert first.test[0] is not second.test[0]  # each job gets its own copies
    DATASET_REGISTRY.get("PACS")(cfg)
    assert len(calls) == 2  # disabled (plain train.py): read every time


@pytest.mark.parametrize("weights", ["file", "random"])
def test_worker_memo_builds_clip_once_per_random_state(tmp_path, monkeypatch, weights):
    """A worker builds each CLIP once; a hit leaves the random stream where a fresh build would, and every job
    gets its own copy (random weights: one model per starting random state)."""
    import torch
    from yacs.config import CfgNode as CN

    import trainers.clip_common as cc
    from dassl.utils import resources, set_random_seed

    if weights == "file":
        set_random_seed(0)
        path = str(tmp_path / "tiny.pt")
        torch.save(cc.load_clip("tiny-rn-test", "random").model.state_dict(), path)
    else:
        path = "random"
    cfg = CN({"MODEL": CN({"BACKBONE": CN({"NAME": "tiny-rn-test", "WEIGHTS": path})})})
    calls = []
    real = cc.load_clip
    monkeypatch.setattr(cc, "load_clip", lambda *a: calls.append(a) or real(*a))

    def build(seed):
        set_random_seed(seed)
        bundle = cc.load_clip_to_cpu(cfg)
        return bundle, torch.get_rng_state(), torch.rand(3)

    fresh = {seed: build(seed) for seed in (1, 2)}  # memo off (plain train.py): built every time
    assert len(calls) == 2
    resources.enable()
    try:
        got = [build(seed) for seed in (1, 1, 2, 1)]
    finally:
        resources.enable(False)
    assert len(calls) == 4  # once per starting random state (seeds 1 and 2)
    for (bundle, state, draw), seed in zip(got, (1, 1, 2, 1)):
        ref_bundle, ref_state, ref_draw = fresh[seed]
        assert torch.equal(state, ref_state) and torch.equal(draw, ref_draw)
        for (k, v), (_, w) in zip(bundle.model.state_dict().items(), ref_bundle.model.state_dict().items()):
            assert torch.equal(v, w), k
    got[0][0].model.visual.half()  # a job changing its copy does not reach the next job's
    assert got[1][0].model is not got[0][0].model
    assert next(got[1][0].model.visual.parameters()).dtype == torch.float32


def test_inprocess_job_restores_environment(data, tmp_path, monkeypatch):
    from launch.launchers import run_job_inprocess

    monkeypatch.delenv("CROFT_NO_PROGRESS", raising=False)
    job = _jobs(data, str(tmp_path), [("bad", 1, 1)])[0]
    job.argv[job.argv.index("TEST_ENV") + 1] = "mars"  # fails while building the dataset
    ok, msg = run_job_inprocess(job, quiet=True)  # quiet sets CROFT_NO_PROGRESS for the job
    assert not ok and "mars" in msg
    assert "CROFT_NO_PROGRESS" not in os.environ


def test_lone_jobs_get_the_cores_of_idle_workers(monkeypatch):
    """Torch threads per job: the cores divided by the jobs that run alongside it (a stacked λ-sweep alone on a
    2-worker pool gets both cores; a full pool one each)."""
    from types import SimpleNamespace

    from launch.workers import WorkerLauncher

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    pool = [SimpleNamespace(job=None) for _ in range(4)]
    pool[0].job = "sent now"
    assert WorkerLauncher._threads(pool, pending=0) == 8
    assert WorkerLauncher._threads(pool, pending=1) == 4
    pool[1].job = "running"
    assert WorkerLauncher._threads(pool, pending=0) == 4
    assert WorkerLauncher._threads(pool, pending=10) == 2


def test_worker_threads_honour_omp_num_threads(monkeypatch):
    """OMP_NUM_THREADS caps a job's torch threads as it caps torch's default (8 cores, one lone job: 8 threads)."""
    from types import SimpleNamespace

    from launch.workers import WorkerLauncher

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    pool = [SimpleNamespace(job="sent now"), SimpleNamespace(job=None)]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert WorkerLauncher._threads(pool, pending=0) == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert WorkerLauncher._threads(pool, pending=0) == 3
    assert WorkerLauncher._threads(pool, pending=1) == 3  # 8 // 2 = 4 cores each, capped at 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert WorkerLauncher._threads(pool, pending=5) == 1


def test_a_call_runs_in_the_first_worker(capsys):
    """``WorkerLauncher.call`` (a driver plans in its worker): the function runs there, what it prints is printed
    here and what it raises is raised here; an answer that cannot be sent is one RuntimeError; a dead worker is
    ``WorkerLost`` (the driver then computes it itself)."""
    from launch.launchers import LaunchOptions, WorkerLost
    from launch.workers import WorkerLauncher

    runner = WorkerLauncher(LaunchOptions(jobs=1))
    try:
        pid = runner.call("os:getpid")
        assert pid == runner._pool[0].process.pid and pid != os.getpid()
        runner.call("builtins:print", "from the worker")
        assert capsys.readouterr().out == "from the worker\n"
        with pytest.raises(SystemExit, match="error: a planned refusal"):
            runner.call("sys:exit", "error: a planned refusal")
        with pytest.raises(RuntimeError, match="threading:Lock: the worker cannot send its answer"):
            runner.call("threading:Lock")
        assert runner.call("os:getpid") == pid  # the same worker goes on
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerLost, match="killed by SIGKILL"):
            runner.call("os:getpid")
    finally:
        runner.close()
