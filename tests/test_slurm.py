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
        "DATASET.NUM_SHOTS", "2", "TEST_ENV", "sketch"]  # default keys: requeue resumes from the rolling checkpoint


def _slurm_args(**kw) -> argparse.Namespace:
    from launch.launchers import add_launcher_args

    p = argparse.ArgumentParser()
    add_launcher_args(p)
    # no --gpus-per-job: the runs' DEVICE cpu (OPTS) means no GPU request
    return p.parse_args(["--launcher", "slurm", "--cpus-per-job", "1", "--time", "30",
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


def _job(*argv):
    from launch.sweep import Job

    return Job("a", "/tmp/a", list(argv))


def test_gpus_per_task_follow_the_runs_device():
    """Default: no GPU request when every run's DEVICE is cpu (last DEVICE override wins over --device), else 1;
    an explicit value is used, except GPUs for CPU-only runs (one-line refusal)."""
    from submitit.slurm.slurm import _make_sbatch_string

    from launch.slurm import executor_parameters

    cpu = [_job("--device", "cuda", "DEVICE", "cpu"), _job("--seed", "1", "DEVICE", "cpu")]
    params = executor_parameters(_slurm_args(), cpu)
    assert "gpus_per_node" not in params
    text = _make_sbatch_string(command="python -m x", folder="/tmp/f/%j", map_count=2, **params)
    assert "--gpus-per-node" not in text and "--gres" not in text and "#SBATCH --cpus-per-task=1" in text
    for jobs in ([_job("--device", "cuda")], [_job("DEVICE", "auto")], [*cpu, _job("DEVICE", "cuda:1")], []):
        assert executor_parameters(_slurm_args(), jobs)["gpus_per_node"] == 1
    assert executor_parameters(_slurm_args(extra=["--gpus-per-job", "3"]), [_job()])["gpus_per_node"] == 3
    assert "gpus_per_node" not in executor_parameters(_slurm_args(extra=["--gpus-per-job", "0"]), [_job()])
    with pytest.raises(ValueError, match=r"^--gpus-per-job 2 with --device cpu: the runs would not use the GPUs"):
        executor_parameters(_slurm_args(extra=["--gpus-per-job", "2"]), cpu)


def test_gpus_for_cpu_runs_are_refused_before_submitting(tmp_path, capsys):
    from launch.sweep import run_jobs

    job = _job("--seed", "1", "DEVICE", "cpu")
    with pytest.raises(SystemExit, match=r"^error: --gpus-per-job 2 with --device cpu: the runs would not use"):
        run_jobs([job], launcher="slurm", sweep_dir=str(tmp_path / "s"),
                 args=_slurm_args(extra=["--gpus-per-job", "2"]))
    assert not (tmp_path / "s").exists()  # nothing submitted


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
    """When the victim has saved a rolling checkpoint (epoch 1-7 of 8), send submitit's preemption signal to its
    array task.

    Slurm holds a requeued batch job for about two minutes before it may start again; once the task is back in
    the queue, its start time is set to now (``scontrol update``) so the test does not wait for that.
    """
    while not stop.is_set():
        ckpts = glob.glob(os.path.join(job.output_dir, "*", "model.pth.tar-[1-7]"))
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
    assert logs == [os.path.join(jobs[1].output_dir, "log.txt")]  # one log, continued after a marker line
    resumed = open(logs[0]).read().split("*** log continues: run started again")[-1]
    assert "will resume training" in resumed and "epoch = 0)" not in resumed
    # resubmitting the sweep submits nothing: every run has its done marker
    before = _squeue(cluster.env["SLURM_CONF"])
    assert run_jobs(jobs, launcher="slurm", sweep_dir=sweep_dir, args=_slurm_args()) == 0
    assert _squeue(cluster.env["SLURM_CONF"]) == before


def _driver(cluster, data: str, out: str, *flags: str):
    """``scripts/CRoFT/run_setup2.py --launcher slurm`` (1 run) as a user runs it; returns the finished process."""
    import sys

    cmd = [sys.executable, "scripts/CRoFT/run_setup2.py", "--root", data, "--output-root", out, "--launcher", "slurm",
           "--cpus-per-job", "1", "--time", "30", "--datasets", "PACS", "--cfgs", "rn50_ep30", "--domains", "sketch",
           "--seeds", "1", "--shots", "2", "--epochs", "1", "--lambda1", "15", "--lambda2", "1", "--ratios",
           "0.2,0.5", "--gen-step", "0", *flags, "--", *OPTS[:10]]
    env = dict(cluster.env, HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, cwd=COOP, env=env, capture_output=True, text=True, timeout=600)


def _error_line(res) -> str:
    """The driver's last stderr line; the whole stderr has no traceback."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.strip()][-1]


def test_driver_on_cpu_asks_no_gpu_and_refused_submissions_are_one_line(cluster, tmp_path):
    """``--device cpu`` with the default ``--gpus-per-job`` runs on a GPU-less one-node Slurm; sbatch's refusals
    (a GPU asked of a node without any, an unknown partition) are one line with its reason, exit code 2."""
    data = str(tmp_path / "data")
    write_lodo_tree(data, per_class=3)
    out = str(tmp_path / "out")
    res = _driver(cluster, data, out, "--device", "cpu")
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    (run,) = glob.glob(os.path.join(out, "CRoFT", "*", "test_on_sketch.json", "seed1", "shots2"))
    assert os.path.isfile(os.path.join(run, "done"))
    (script,) = glob.glob(os.path.join(out, "sweeps", "setup2_train", "slurm", "*", "*_submission.sh"))
    text = open(script).read()
    assert "#SBATCH --cpus-per-task=1" in text and "gpus" not in text and "gres" not in text

    # sbatch's stderr lines (without their "sbatch: error: " prefix) make the reason
    for flags, reason in ((["--device", "cuda"], "Invalid generic resource (gres) specification"),
                          (["--device", "cpu", "--slurm-partition", "nosuch"],
                           "invalid partition specified: nosuch; Batch job submission failed: Invalid partition name "
                           "specified")):
        fresh = str(tmp_path / f"out_{flags[1]}")
        res = _driver(cluster, data, fresh, *flags)
        assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-3000:])
        assert _error_line(res) == f"error: sbatch refused the job array of 1 runs: {reason}"
        assert res.stderr.count(reason.split("; ")[-1]) == 1  # submitit's own echo of sbatch's stderr is not shown
        assert not glob.glob(os.path.join(fresh, "CRoFT", "**", "done"), recursive=True)


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
