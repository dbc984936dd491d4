"""Slurm launcher through submitit: ``--launcher slurm`` submits a sweep's unfinished runs as ONE job array.

Each array task runs ``python train.py ...`` for one run (cwd: the CoOp folder). Logs (sbatch script, stdout,
stderr of every task) go to ``<sweep folder>/slurm/``. A task that is preempted or reaches its time limit gets
submitit's signal (``USR2``, 90 s ahead): the run is checkpointed as a submission (:meth:`SlurmRun.checkpoint`)
and the task is requeued with ``scontrol requeue``; when it starts again ``train.py`` resumes from the last
checkpoint in the run's output folder (Dassl's ``resume_model_if_exist``). A task whose run already has its
``done`` marker returns at once, and a resubmitted sweep only submits runs without one. The driver waits for
the array and reports each run as the other launchers do. GPUs per task follow the runs' device (none for
``--device cpu``, :func:`gpus_per_run`); a submission sbatch refuses is SystemExit with its reason in one line.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Optional

from launch.launchers import COOP_DIR, Launcher, Report, register_launcher

# squeue states of a task that may still produce its run (anything else: it left the queue)
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "STOPPED"}


class SlurmRun:
    """The callable of one array task: run one sweep job; checkpointable, so submitit requeues it."""

    def __call__(self, job: Any) -> str:
        if job.done():
            return "already done"
        os.makedirs(os.path.dirname(os.path.abspath(job.output_dir)), exist_ok=True)
        print(f"run {job.name}: python train.py {shlex.join(job.argv)}", flush=True)
        env = dict(os.environ, CROFT_NO_PROGRESS="1")
        # the run ignores submitit's requeue signal: it trains on until Slurm stops the task, so its last
        # epoch checkpoint is kept, while the submitit process (its parent) checkpoints and requeues the task
        res = subprocess.run(job.command(), cwd=COOP_DIR, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
        if res.returncode != 0:
            raise RuntimeError(f"train.py exited with code {res.returncode} (log: {job.output_dir}/log.txt)")
        return "done"

    def checkpoint(self, job: Any) -> Any:
        """Called by submitit on preemption/time-out: resubmit the same run (it resumes from its checkpoints)."""
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmRun(), job)


def parse_extra(items: Optional[list[str]]) -> dict[str, str]:
    """``--slurm-extra KEY=VAL`` items -> sbatch options (``KEY`` without dashes, e.g. ``account=abc``)."""
    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm-extra {item!r}: expected KEY=VAL (an sbatch option, e.g. account=myproj)")
        out[key.strip().lstrip("-")] = val
    return out


def extra_item(item: str) -> str:
    """argparse type of ``--slurm-extra``: a bad item is a one-line usage error."""
    try:
        parse_extra([item])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return item


def run_device(argv: list[str]) -> str:
    """The ``DEVICE`` a ``train.py`` command line runs on: its last ``DEVICE`` override (overrides win over flags),
    else its ``--device`` flag, else ``auto``."""
    flag = override = ""
    for key, value in zip(argv, argv[1:]):
        if key == "--device":
            flag = value
        elif key == "DEVICE":
            override = value
    return override or flag or "auto"


def gpus_per_run(requested: Optional[int], jobs: list[Any]) -> int:
    """GPUs to ask per array task: ``--gpus-per-job`` if given, else none when every run's device is ``cpu``
    and 1 otherwise. GPUs asked for runs that all run on the CPU are refused (ValueError, one line)."""
    on_cpu = bool(jobs) and all(run_device(j.argv) == "cpu" for j in jobs)
    if requested is None:
        return 0 if on_cpu else 1
    if requested > 0 and on_cpu:
        raise ValueError(f"--gpus-per-job {requested} with --device cpu: the runs would not use the GPUs "
                         f"(drop --gpus-per-job, or run them on cuda)")
    return int(requested)


def executor_parameters(args: argparse.Namespace, jobs: Optional[list[Any]] = None) -> dict[str, Any]:
    """``submitit.SlurmExecutor.update_parameters`` keywords from the driver's Slurm flags and the runs
    (their device decides the default GPU request, :func:`gpus_per_run`)."""
    params: dict[str, Any] = {
        "time": int(args.time),
        "cpus_per_task": int(args.cpus_per_job),
        "array_parallelism": int(args.array_parallelism),
        "setup": [f"cd {shlex.quote(COOP_DIR)}"],  # train.py's relative config paths, importable `launch`
        "additional_parameters": {"requeue": True, **parse_extra(args.slurm_extra)},
    }
    gpus = gpus_per_run(args.gpus_per_job, list(jobs or []))
    if gpus:
        params["gpus_per_node"] = gpus
    if args.slurm_partition:
        params["partition"] = args.slurm_partition
    return params


@register_launcher("slurm")
class SlurmLauncher(Launcher):
    """One Slurm job array per sweep (submitit); waits for it and reports every run."""

    poll_seconds = 5.0

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("Slurm (--launcher slurm)")
        g.add_argument("--slurm-partition", default="", help="partition of the job array (default: the cluster's)")
        g.add_argument("--gpus-per-job", type=int, default=None,
                       help="GPUs per run (default: none with --device cpu, else 1; 0: no GPU request)")
        g.add_argument("--cpus-per-job", type=int, default=4, help="CPU cores per run")
        g.add_argument("--time", type=int, default=180, help="time limit of one run, minutes (requeued after it)")
        g.add_argument("--array-parallelism", type=int, default=64, help="runs of the array running at once")
        g.add_argument("--slurm-extra", action="append", metavar="KEY=VAL", type=extra_item,
                       help="extra sbatch option, repeatable (e.g. account=myproj, qos=normal)")

    def _defaults(self) -> argparse.Namespace:
        p = argparse.ArgumentParser(add_help=False)
        self.add_args(p)
        ns = p.parse_args([])
        for k, v in vars(self.options.args).items():
            setattr(ns, k, v)
        return ns

    def run(self, jobs: list[Any], report: Report) -> None:
        try:
            import submitit
        except ImportError:
            raise SystemExit("error: --launcher slurm needs submitit (pip install -r requirements.txt)") from None
        try:
            params = executor_parameters(self._defaults(), jobs)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        if shutil.which("sbatch") is None:
            raise SystemExit("error: --launcher slurm: no sbatch on PATH (run the driver where Slurm's client "
                             "commands are, e.g. a login node)")
        folder = os.path.join(self.options.sweep_dir or os.path.join(COOP_DIR, "output", "sweeps", "slurm"),
                              "slurm")
        executor = submitit.SlurmExecutor(folder=os.path.join(folder, "%j"), python=sys.executable)
        name = os.path.basename(os.path.normpath(self.options.sweep_dir)) or "croft"
        executor.update_parameters(job_name=name, **params)
        submitted = submit_array(executor, jobs)
        ids = [s.job_id for s in submitted]
        print(f"submitted {len(jobs)} runs as Slurm job array {ids[0].split('_')[0]} (logs: {folder})", flush=True)
        self.wait(list(zip(jobs, submitted)), report)

    def wait(self, pairs: list[tuple[Any, Any]], report: Report) -> None:
        """Poll until every run has its ``done`` marker, a result (error) from submitit, or left the queue."""
        gone: dict[str, int] = {}
        while pairs:
            states = queue_states(pairs[0][1].job_id.split("_")[0])
            left = []
            for job, sj in pairs:
                if job.done():
                    report(job, True, "")
                elif sj.paths.result_pickle.exists():
                    report(job, False, _outcome_message(sj))
                elif states is not None and states.get(sj.job_id) not in ACTIVE_STATES:
                    gone[sj.job_id] = gone.get(sj.job_id, 0) + 1
                    if gone[sj.job_id] >= 3:
                        report(job, False, f"Slurm task {sj.job_id} left the queue without finishing its run "
                                           f"(state {states.get(sj.job_id, 'gone')}; see {sj.paths.stderr})")
                    else:
                        left.append((job, sj))
                else:
                    gone.pop(sj.job_id, None)
                    left.append((job, sj))
            pairs = left
            if pairs:
                time.sleep(self.poll_seconds)


def submit_array(executor: Any, jobs: list[Any]) -> list[Any]:
    """Submit ``jobs`` as one array; a refused submission is SystemExit with sbatch's reason in one line."""
    import submitit

    captured = io.StringIO()  # submitit echoes sbatch's stderr before raising: keep it for the one line
    try:
        with contextlib.redirect_stderr(captured):
            return executor.map_array(SlurmRun(), jobs)
    except (submitit.core.utils.FailedJobError, OSError) as err:
        lines = [ln.strip() for ln in (str(err) or captured.getvalue()).splitlines() if ln.strip()]
        reason = "; ".join(ln[len("sbatch: error: "):] if ln.startswith("sbatch: error: ") else ln for ln in lines)
        raise SystemExit(f"error: sbatch refused the job array of {len(jobs)} runs: "
                         f"{reason or type(err).__name__}") from None


def queue_states(array_id: str) -> Optional[dict[str, str]]:
    """``{"<array>_<task>": STATE}`` of the array's tasks still known to ``squeue``; None if squeue failed."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", array_id, "-o", "%i %T"], text=True,
                             capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return {} if "Invalid job id" in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            for task in expand_task_ids(parts[0]):
                states[task] = parts[1]
    return states


def expand_task_ids(squeue_id: str) -> list[str]:
    """``12_[0-2,5%2]`` (a pending array) -> ``12_0 12_1 12_2 12_5``; other ids unchanged."""
    base, sep, rest = squeue_id.partition("_[")
    if not sep:
        return [squeue_id]
    out = []
    for part in rest.rstrip("]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _outcome_message(sj: Any) -> str:
    try:
        sj.result()
        return "the task ended but the run has no done marker"
    except Exception as err:  # submitit re-raises the task's error
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        return lines[-1] if lines else type(err).__name__
