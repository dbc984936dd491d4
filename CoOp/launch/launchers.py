"""How a sweep's jobs are executed: launchers registered by name (``--launcher NAME``).

A launcher is one class registered with :func:`register_launcher`; it receives the unfinished jobs and calls
``report(job, ok, message)`` once per job. Built in:

* ``workers`` (default): ``--jobs N`` long-lived worker processes (:mod:`launch.workers`) that import the code,
  load CLIP and open feature stores once and run many jobs, each with a fresh trainer, seed and log;
* ``process``: one ``python train.py`` process per job (the official flow; ``subprocess`` is an alias);
* ``inprocess``: jobs run one after another inside the driver's process (no fault isolation).

Launchers living in other modules (``workers``, ``slurm``) are listed in :data:`PLUGINS` (name -> module) and
imported on first use (they import this module, never the reverse); a launcher's own command-line flags come from
its ``add_args`` class method.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from launch.jobs import Job

COOP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Report = Callable[[Job, bool, str], None]

LAUNCHERS: dict[str, type["Launcher"]] = {}
ALIASES = {"subprocess": "process"}
# launcher name -> module that registers it (imported on first use; such a module imports this one, never the reverse)
PLUGINS: dict[str, str] = {"workers": "launch.workers", "slurm": "launch.slurm"}
DEFAULT_LAUNCHER = "workers"


@dataclass
class LaunchOptions:
    """What every launcher may use; ``args`` is the parsed driver command line (launcher-specific flags)."""

    jobs: int = 1
    devices: Optional[list[str]] = None
    quiet: bool = True
    retry: bool = False
    sweep_dir: str = ""
    args: Any = field(default_factory=argparse.Namespace)


class WorkerLost(RuntimeError):
    """A launcher's worker died while it ran a call (``WorkerLauncher.call``); the caller computes it itself."""


class Launcher:
    """Base class: ``run`` executes ``jobs`` and calls ``report`` once per job."""

    name = ""

    def __init__(self, options: LaunchOptions) -> None:
        self.options = options
        self.job_times: list[dict[str, Any]] = []  # per finished job: name, sent, began, ended (time.time())

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add this launcher's own flags to a driver's parser (none by default)."""

    def start(self) -> None:
        """Get ready before the jobs are known (the workers launcher starts its processes); nothing by default."""

    def run(self, jobs: list[Job], report: Report) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the launcher keeps between ``run`` calls (nothing by default)."""


def register_launcher(name: str) -> Callable[[type[Launcher]], type[Launcher]]:
    """Class decorator: make a launcher available as ``--launcher NAME``."""

    def deco(cls: type[Launcher]) -> type[Launcher]:
        cls.name = name
        LAUNCHERS[name] = cls
        return cls

    return deco


def _load_plugins() -> None:
    for name, module in PLUGINS.items():
        if name not in LAUNCHERS:
            try:
                importlib.import_module(module)
            except ImportError:  # not shipped in this tree: the name stays unavailable
                pass


def launcher_names() -> list[str]:
    _load_plugins()
    return sorted(LAUNCHERS) + sorted(ALIASES)


def get_launcher(name: str) -> type[Launcher]:
    """The launcher class registered as ``name`` (aliases accepted); ValueError naming the choices otherwise."""
    name = ALIASES.get(name, name)
    if name not in LAUNCHERS:
        _load_plugins()
    if name not in LAUNCHERS:
        raise ValueError(f"unknown launcher {name!r} (choose from {', '.join(launcher_names())})")
    return LAUNCHERS[name]


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    """The launcher flags every driver shares (how runs are executed, not what they compute)."""
    p.add_argument("--launcher", choices=launcher_names(), default=DEFAULT_LAUNCHER,
                   help="workers: persistent worker processes (default); process: one python process per run; "
                        "inprocess: runs inside this process")
    p.add_argument("--jobs", type=int, default=1, help="parallel runs (worker processes for --launcher workers)")
    p.add_argument("--devices", nargs="+", help="GPU ids assigned round-robin to workers")
    p.add_argument("--retry", action="store_true", help="run a failed job once more (e.g. its worker was killed)")
    p.add_argument("--stack", action="store_true",
                   help="train runs that differ only in their trainer's STACK_KEYS (CRoFT: lambda1/lambda2) as one "
                        "vectorised run per seed/domain/config (train.py --member; equal to separate runs to 1e-5)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--verbose", action="store_true", help="show each run's log on the console")
    for name in sorted(LAUNCHERS):
        LAUNCHERS[name].add_args(p)
    p.epilog = "Extra yacs overrides for every run go after '--', e.g. -- OPTIM.MAX_EPOCH 5 DEVICE cuda"


# ---------------------------------------------------------------------------------------------------------------
def run_job_inprocess(job: Job, quiet: bool) -> tuple[bool, str]:
    """Run one job with ``train.main`` in this process; environment variables are restored afterwards."""
    import contextlib
    import io

    from dassl.utils.errors import UserError
    from dassl.utils.logger import restore_stdout
    from launch.entry import train_module

    train = train_module()

    import torch

    saved_env = dict(os.environ)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if quiet:
        os.environ["CROFT_NO_PROGRESS"] = "1"
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            train.main(job.argv)
        return True, ""
    except UserError as err:
        return False, f"error: {err}"
    except Exception as err:  # a failing job must not stop the sweep
        return False, f"{type(err).__name__}: {err}"
    finally:
        restore_stdout()
        os.environ.clear()
        os.environ.update(saved_env)
        torch.use_deterministic_algorithms(deterministic)


def _die_with_driver() -> None:
    """In a job's child process (Linux): SIGKILL it when the driver dies (``PR_SET_PDEATHSIG``)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def run_job_subprocess(job: Job, quiet: bool, env: Optional[dict[str, str]] = None) -> tuple[bool, str]:
    """Run one job as ``python train.py ...`` (cwd: the CoOp folder); the last stderr line explains a failure."""
    os.makedirs(os.path.dirname(os.path.abspath(job.output_dir)), exist_ok=True)
    env = dict(env if env is not None else os.environ)
    if quiet:
        env["CROFT_NO_PROGRESS"] = "1"
    res = subprocess.run(job.command(), cwd=COOP_DIR, env=env, text=True, preexec_fn=_die_with_driver,
                         stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE)
    if not quiet and res.stderr:
        sys.stderr.write(res.stderr)
    if res.returncode == 0:
        return True, ""
    tail = [ln for ln in res.stderr.strip().splitlines() if ln.strip()][-1:] if res.stderr else []
    return False, f"exit code {res.returncode}" + (f": {tail[0]}" if tail else "")


@register_launcher("inprocess")
class InProcessLauncher(Launcher):
    """Jobs one after another in this process (fast for tiny runs; a crash stops the sweep)."""

    def run(self, jobs: list[Job], report: Report) -> None:
        for job in jobs:
            t0 = time.time()
            ok, msg = run_job_inprocess(job, self.options.quiet)
            if not ok and self.options.retry:
                ok, msg = run_job_inprocess(job, self.options.quiet)
            self.job_times.append({"name": job.name, "sent": t0, "began": t0, "ended": time.time()})
            report(job, ok, msg)


@register_launcher("process")
class ProcessLauncher(Launcher):
    """One ``python train.py`` process per job (the official flow), ``--jobs N`` of them at a time."""

    def _env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        if self.options.devices:
            env["CUDA_VISIBLE_DEVICES"] = self.options.devices[slot % len(self.options.devices)]
        return env

    def _one(self, job: Job, slot: int) -> tuple[Job, bool, str]:
        t0 = time.time()
        ok, msg = run_job_subprocess(job, self.options.quiet, self._env(slot))
        if not ok and self.options.retry:
            ok, msg = run_job_subprocess(job, self.options.quiet, self._env(slot))
        self.job_times.append({"name": job.name, "sent": t0, "began": t0, "ended": time.time()})  # thread-safe
        return job, ok, msg

    def run(self, jobs: list[Job], report: Report) -> None:
        n = max(1, self.options.jobs)
        if n == 1:
            for job in jobs:
                report(*self._one(job, 0))
            return
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(self._one, job, i % n) for i, job in enumerate(jobs)]
            for fut in as_completed(futures):
                report(*fut.result())


def make_launcher(name: str, options: LaunchOptions) -> Launcher:
    return get_launcher(name)(options)

