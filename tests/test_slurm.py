"""``--launcher slurm`` against a REAL one-node Slurm (slurm-wlm + munge started here, stopped by pid).

Skipped, with the reason, where the packages are missing and cannot be installed (not root / no apt-get).
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import threading
import time

import pytest

from helpers import COOP
from synthetic import write_lodo_tree

OPTS = ["MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DEVICE", "cpu",
        "TRAIN.CHECKPOINT_FREQ", "1", "DATASET.NUM_SHOTS", "2", "TEST_ENV", "sketch"]


def _slurm_args(**kw) -> argparse.Namespace:
    from launch.launchers import add_launcher_args

    p = argparse.ArgumentParser()
    add_launcher_args(p)
    return p.parse_args(["--launcher", "slurm", "--gpus-per-job", "0", "--cpus-per-job", "1", "--time", "30",
                         "--array-parallelism", "2", *kw.get("extra", [])])


def test_slurm_flags_make_one_sbatch_array():
    """The flags land in the sbatch script of one job array (submitit writes it; checked without Slurm)."""
    from submitit.slurm.slurm import _make_sbatch_string

    from launch.slurm import executor_parameters

    args = _slurm_args(extra=["--slurm-partition", "gpu", "--gpus-per-job", "2", "--slurm-extra", "account=abc",
                              "--slurm-extra", "qos=high"])
    params = executor_parameters(args)
    text = _make_sbatch_string(command="python -m x", folder="/tmp/f/%j", map_count=5,
                               **{k: v for k, v in params.items() if k != "array_parallelism"},
                               array_parallelism=params["array_parallelism"])
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --time=30", "#SBATCH --array=0-4%2", "#SBATCH --account=abc", "#SBATCH --qos=high",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@90"):
        assert line in text, line


def test_slurm_flag_defaults():
    from launch.launchers import add_launcher_args
    from launch.slurm import executor_parameters

    p = argparse.ArgumentParser()
    add_launcher_args(p)
    params = executor_parameters(p.parse_args(["--launcher", "slurm"]))
    assert (params["gpus_per_node"], params["cpus_per_task"], params["time"], params["array_parallelism"]) == \
        (1, 4, 180, 64)
    assert "partition" not in params and params["additional_parameters"] == {"requeue": True}


def test_bad_slurm_extra_is_one_clear_error(capsys):
    from launch.launchers import add_launcher_args

    p = argparse.ArgumentParser()
    add_launcher_args(p)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--launcher", "slurm", "--slurm-extra", "account"])
    assert exc.value.code == 2
    assert "--slurm-extra 'account': expected KEY=VAL" in capsys.readouterr().err


def test_no_sbatch_is_one_clear_error(tmp_path, monkeypatch):
    from launch.sweep import Job, run_jobs

    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm client commands here
    job = Job("a", str(tmp_path / "a"), ["--help"])
    with pytest.raises(SystemExit, match="--launcher slurm: no sbatch on PATH"):
        run_jobs([job], launcher="slurm", sweep_dir=str(tmp_path / "s"), args=_slurm_args())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import slurm_cluster as sc

    reason = sc.ensure_packages()
    if reason:
        pytest.skip(reason)
    c = sc.start_cluster(str(tmp_path_factory.mktemp("slurm")))
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = c.env["SLURM_CONF"]
    try:
        yield c
    finally:
        sc.stop_cluster(c)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
    assert not c.procs


def _jobs(data: str, out: str, spec: list[tuple[str, int, int]]) -> list:
    from launch.sweep import Job

    base = ["--root", data, "--trainer", "CRoFT", "--dataset-config-file",
            os.path.join(COOP, "configs", "datasets", "PACS.yaml"), "--config-file",
            os.path.join(COOP, "configs", "trainers", "CRoFT", "rn50_ep30.yaml")]
    return [Job(name, os.path.join(out, name), [*base, "--seed", str(seed), "--output-dir", os.path.join(out, name),
                                                *OPTS, "OPTIM.MAX_EPOCH", str(epochs)])
            for name, epochs, seed in spec]


def _squeue(env_conf: str) -> str:
    return subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], capture_output=True, text=True,
                          env=dict(os.environ, SLURM_CONF=env_conf)).stdout


def _preempt_after_first_checkpoint(job, sweep_dir: str, stop: threading.Event, sent: list) -> None:
    """When the victim has saved its epoch-1 checkpoint, send submitit's preemption signal to its array task.

    Slurm holds a requeued batch job for about two minutes before it may start again; once the task is back in
    the queue, its start time is set to now (``scontrol update``) so the test does not wait for that.
    """
    while not stop.is_set():
        ckpts = glob.glob(os.path.join(job.output_dir, "*", "model.pth.tar-1"))
        ids = [os.path.basename(p) for p in glob.glob(os.path.join(sweep_dir, "slurm", "*_1"))]
        if ckpts and ids:
            subprocess.run(["scancel", "--signal", "USR2", ids[0]], check=True)
            sent.append(ids[0])
            break
        time.sleep(0.2)
    while not stop.is_set() and sent:
        state = subprocess.run(["squeue", "-h", "-j", sent[0], "-o", "%T"], capture_output=True, text=True).stdout
        if "PENDING" in state:
            subprocess.run(["scontrol", "update", f"JobId={sent[0]}", "StartTime=now"], check=True)
            return
        time.sleep(0.2)


def test_sweep_runs_to_done_and_a_preempted_run_is_requeued_and_resumed(cluster, tmp_path):
    from launch.sweep import run_jobs

    data = str(tmp_path / "data")
    write_lodo_tree(data, per_class=3)
    sweep_dir = str(tmp_path / "out" / "sweeps" / "mini")
    jobs = _jobs(data, str(tmp_path / "out"), [("quick", 1, 1), ("victim", 8, 2)])
    stop, sent = threading.Event(), []
    killer = threading.Thread(target=_preempt_after_first_checkpoint, args=(jobs[1], sweep_dir, stop, sent))
    killer.start()
    try:
        failures = run_jobs(jobs, launcher="slurm", sweep_dir=sweep_dir, args=_slurm_args())
    finally:
        stop.set()
        killer.join()
    assert sent, "the victim was never signalled"
    assert failures == 0 and all(j.done() for j in jobs)
    # one job array for the sweep, logs under the sweep folder
    arrays = {os.path.basename(p).split("_")[0] for p in glob.glob(os.path.join(sweep_dir, "slurm", "*_*"))}
    assert len(arrays) == 1 and sent[0].startswith(arrays.pop() + "_")
    task_log = open(glob.glob(os.path.join(sweep_dir, "slurm", sent[0], "*_log.err"))[0]).read()
    assert "this job is preempted" in task_log and "DUE TO JOB REQUEUE" in task_log
    # the requeued task started the run again, which resumed from its checkpoint instead of epoch 0
    logs = sorted(glob.glob(os.path.join(jobs[1].output_dir, "log.txt*")))
    assert len(logs) == 2
    resumed = open([p for p in logs if p != os.path.join(jobs[1].output_dir, "log.txt")][0]).read()
    assert "will resume training" in resumed and "epoch = 0)" not in resumed
    # resubmitting the sweep submits nothing: every run has its done marker
    before = _squeue(cluster.env["SLURM_CONF"])
    assert run_jobs(jobs, launcher="slurm", sweep_dir=sweep_dir, args=_slurm_args()) == 0
    assert _squeue(cluster.env["SLURM_CONF"]) == before


@pytest.mark.slow
def test_extraction_step_runs_torchrun_ranks_under_srun(cluster, tmp_path):
    """``scripts/slurm/extract_features.sbatch``: srun + torchrun, 2 ranks on the node, each appends its shards."""
    import socket
    import sys

    from dassl.engine.feature_store import FeatureStore

    data, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    write_lodo_tree(data, per_class=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--root", data, "--seed", "1", "--trainer", "ZeroshotCLIP", "--dataset-config-file",
            "configs/datasets/PACS.yaml", "--config-file", "configs/trainers/ZeroshotCLIP/rn50_ep30.yaml",
            *OPTS[:10], "TEST_ENV", "sketch", "DATASET.NUM_SHOTS", "2", "FEATURE_CACHE.TRAIN_VIEWS", "2",
            "FEATURE_CACHE.DIR", cache]
    env = dict(os.environ, NPROC_PER_NODE="2", PYTHON=sys.executable, MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    out = str(tmp_path / "extract.out")
    res = subprocess.run(["sbatch", "--wait", "--nodes", "1", "--cpus-per-task", "2", "--time", "20", "-o", out,
                          "scripts/slurm/extract_features.sbatch", *args], cwd=COOP, env=env, capture_output=True,
                         text=True, timeout=600)
    log = open(out).read() if os.path.isfile(out) else ""
    assert res.returncode == 0, (res.stderr, log[-3000:])
    assert "rank 0 of 2" in log
    (key,) = os.listdir(cache)
    for kind in ("test", "train_v0", "train_v1"):
        folder = os.path.join(cache, key, kind)
        assert {f.split("-")[0] for f in os.listdir(folder) if f.endswith(".npy")} == {"r0", "r1"}
        assert len(FeatureStore(folder)) > 0
