"""Persistent worker processes: the default launcher (``--launcher workers --jobs N``).

Each worker is a fresh interpreter (multiprocessing ``spawn``) that imports the code once, keeps the checked
split lists of the datasets it has read in memory (:mod:`dassl.utils.resources`) and runs job after job with
``train.main``: every job still gets a fresh config, trainer, seed and ``log.txt``, and the environment
variables a job changes are restored. A job that crashes the interpreter or is killed takes down only its
worker: the job is reported as failed (or run once more with ``--retry``) and a new worker takes the slot.
Workers die with the driver (``PR_SET_PDEATHSIG`` on Linux) and are pinned round-robin to ``--devices``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from dataclasses import asdict
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

from launch.launchers import Launcher, Report, register_launcher, run_job_inprocess

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); exit if the parent is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def worker_main(conn: Connection, parent_pid: int, device: Optional[str], threads: int, quiet: bool) -> None:
    """Worker loop: receive ``(job as dict, torch threads)``, run it, send ``(ok, message, seconds)``; None stops."""
    die_with_parent(parent_pid)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    import torch

    torch.set_num_threads(max(1, threads))
    from launch.entry import train_module

    train_module()  # imports paid once per worker
    from dassl.utils import resources
    from launch.sweep import Job

    resources.enable()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job, job_threads = msg
        torch.set_num_threads(max(1, job_threads))
        t0 = time.time()
        ok, text = run_job_inprocess(Job(**job), quiet)
        conn.send((ok, text, time.time() - t0))


def describe_exit(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Worker:
    def __init__(self, ctx: Any, slot: int, device: Optional[str], threads: int, quiet: bool) -> None:
        self.slot = slot
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, os.getpid(), device, threads, quiet),
                                   name=f"croft-worker-{slot}", daemon=True)
        self.process.start()
        child.close()
        self.job: Any = None
        self.attempt = 0

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


@register_launcher("workers")
class WorkerLauncher(Launcher):
    """``--jobs N`` persistent workers; a dead worker fails (or retries) only its job and is replaced."""

    def _spawn(self, ctx: Any, slot: int, n: int) -> _Worker:
        devs = self.options.devices
        threads = max(1, (os.cpu_count() or 1) // n)
        return _Worker(ctx, slot, devs[slot % len(devs)] if devs else None, threads, self.options.quiet)

    keep_alive = False  # True: workers outlive run() (several sweeps through one pool); close() stops them
    _pool: Optional[list[_Worker]] = None

    def close(self) -> None:
        for w in self._pool or []:
            w.stop()
        self._pool = None

    def run(self, jobs: list[Any], report: Report) -> None:
        n = max(1, self.options.jobs if self.keep_alive else min(self.options.jobs, len(jobs)))
        ctx = mp.get_context("spawn")
        pending = deque((job, 0) for job in jobs)
        workers = self._pool or [self._spawn(ctx, i, n) for i in range(n)]
        self._pool = workers
        try:
            while pending or any(w.job is not None for w in workers):
                for i, w in enumerate(workers):
                    if w.job is None and pending:
                        if not w.process.is_alive():  # died while idle
                            w.stop()
                            workers[i] = w = self._spawn(ctx, i, n)
                        w.job, w.attempt = pending.popleft()
                        try:
                            w.conn.send((asdict(w.job), self._threads(workers, len(pending))))
                        except OSError:  # it died just now: _poll reports the job's worker as dead
                            pass
                busy = [w for w in workers if w.job is not None]
                wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for w in busy:
                    result = self._poll(w)
                    if result is None:
                        continue
                    ok, msg = result
                    job, attempt = w.job, w.attempt
                    w.job = None
                    if not w.process.is_alive() or isinstance(msg, _Died):
                        workers[w.slot] = self._spawn(ctx, w.slot, n)
                    if not ok and self.options.retry and attempt == 0:
                        print(f"retrying {job.name} ({msg})", file=sys.stderr)
                        pending.appendleft((job, 1))
                    else:
                        report(job, ok, str(msg))
        finally:
            if not self.keep_alive:
                self.close()

    @staticmethod
    def _threads(workers: list[_Worker], pending: int) -> int:
        """Torch threads for the job being sent: the cores shared by the jobs that will run alongside it (a
        lone job, e.g. a stacked λ-sweep or a sweep's last job, gets the cores of idle workers)."""
        busy = sum(w.job is not None for w in workers)  # the job being sent is already assigned
        return max(1, (os.cpu_count() or 1) // max(1, min(len(workers), busy + pending)))

    @staticmethod
    def _poll(w: _Worker) -> Optional[tuple[bool, Any]]:
        """The finished job's (ok, message), a :class:`_Died` message if the worker died, None if still busy."""
        try:
            if w.conn.poll():
                ok, msg, _ = w.conn.recv()
                return ok, msg
        except (EOFError, OSError):  # the worker closed its end: it is exiting
            w.process.join(timeout=30)
        if w.process.is_alive():
            return None
        w.process.join()
        w.conn.close()
        return False, _Died(f"worker died ({describe_exit(w.process.exitcode)})")


class _Died(str):
    """Failure message of a job whose worker process died."""
