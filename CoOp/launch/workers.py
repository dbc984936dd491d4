"""Persistent worker processes: the default launcher (``--launcher workers --jobs N``).

Each worker is a fresh interpreter (multiprocessing ``spawn``) that imports the code once, keeps the checked
split lists of the datasets it has read in memory (:mod:`dassl.utils.resources`) and runs job after job with
``train.main``: every job still gets a fresh config, trainer, seed and ``log.txt``, and the environment
variables a job changes are restored. A job that crashes the interpreter or is killed takes down only its
worker: the job is reported as failed (or run once more with ``--retry``) and a new worker takes the slot.
Workers die with the driver (``PR_SET_PDEATHSIG`` on Linux) and are pinned round-robin to ``--devices``. A driver
command starts them (:meth:`WorkerLauncher.start`) before it resolves its plan, so they import while it plans, and
keeps them for all its phases (``--then-eval``).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import io
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

from launch.jobs import Job
from launch.launchers import Launcher, Report, WorkerLost, register_launcher, run_job_inprocess

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
    """Worker loop. ``("job", job as dict, torch threads)``: run it, send ``(ok, message, seconds, began)``
    (``began``: wall-clock time the job started here); ``("call", "module:function", args)``: send
    :func:`run_call`'s answer; None ends the process (:func:`exit_now`)."""
    die_with_parent(parent_pid)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    gc.disable()  # the imports create about a million long-lived objects: no collection scans them (-25 % time)
    import torch

    torch.set_num_threads(max(1, threads))
    from launch.entry import train_module

    train = train_module()  # imports paid once per worker, while the driver waits (it starts workers first)
    train.load_plugins(train.PLUGIN_DIR)  # the trainers and datasets every job's config reads
    import open_clip  # noqa: F401  (every job builds a CLIP and its transforms; library code imports these on use)
    import torchvision.transforms  # noqa: F401
    from dassl.utils import resources
    from tqdm import tqdm

    resources.enable()
    # a thread lock for the progress bars: tqdm's default adds a multiprocessing lock, a named semaphore that
    # exit_now's os._exit would leave behind ("leaked semaphore objects" when the driver ends)
    tqdm.set_lock(threading.RLock())
    gc.freeze()  # the imported modules live as long as the worker: later collections skip them
    gc.enable()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            exit_now()
        if msg[0] == "call":
            send_answer(conn, msg[1], run_call(msg[1], msg[2]))
            continue
        _, job, job_threads = msg
        torch.set_num_threads(max(1, job_threads))
        t0 = time.time()
        ok, text = run_job_inprocess(Job(**job), quiet)
        conn.send((ok, text, time.time() - t0, t0))


def run_call(target: str, args: tuple) -> tuple[bool, Any, str]:
    """``(ok, value or exception, printed output)`` of ``module:function(*args)`` run here (its output is
    captured, so that the driver prints it in order)."""
    module, _, name = target.partition(":")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            value = getattr(importlib.import_module(module), name)(*args)
        return True, value, out.getvalue()
    except BaseException as err:  # noqa: B036  (SystemExit too: the driver raises it with its message)
        return False, err, out.getvalue()


def send_answer(conn: Connection, target: str, answer: tuple[bool, Any, str]) -> None:
    """Send :func:`run_call`'s answer; one that cannot be pickled becomes a RuntimeError saying why."""
    try:
        conn.send(answer)
    except (pickle.PicklingError, TypeError, AttributeError) as err:  # pickling fails before anything is sent
        conn.send((False, RuntimeError(f"{target}: the worker cannot send its answer ({err}): {answer[1]!r}"),
                   answer[2]))


def exit_now() -> None:
    """End the worker at once, its output flushed: its jobs wrote their files atomically and it holds nothing
    else, so the interpreter's clean-up of torch & co. (about a second) is skipped (``os._exit``)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def thread_cap(threads: int) -> int:
    """``threads``, at most ``OMP_NUM_THREADS`` when that is set: a worker sets its torch threads explicitly, so it
    honours the variable as torch's own default does (e.g. ``OMP_NUM_THREADS=1`` on a machine shared with other
    work, where two threads of tiny ops spin-wait for each other)."""
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    return max(1, min(threads, int(cap))) if cap.isdigit() and int(cap) > 0 else max(1, threads)


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
        self.used = False  # it was sent a job (a worker that never was holds nothing: it is stopped at once)
        self.sent = 0.0  # when its current job was sent

    def ask_to_stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass

    def stop(self) -> None:
        self.ask_to_stop()
        self.process.join(timeout=10 if self.used else 0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


@register_launcher("workers")
class WorkerLauncher(Launcher):
    """``--jobs N`` persistent workers; a dead worker fails (or retries) only its job and is replaced."""

    def _spawn(self, ctx: Any, slot: int, n: int) -> _Worker:
        devs = self.options.devices
        threads = thread_cap(max(1, (os.cpu_count() or 1) // n))
        return _Worker(ctx, slot, devs[slot % len(devs)] if devs else None, threads, self.options.quiet)

    keep_alive = False  # True: workers outlive run() (several sweeps through one pool); close() stops them
    _pool: Optional[list[_Worker]] = None

    def start(self) -> None:
        """Start the ``--jobs`` workers now, so that they import while the driver still plans (kept until
        :meth:`close`; one that never gets a job is stopped at once)."""
        if self._pool is None:
            n = max(1, self.options.jobs)
            ctx = mp.get_context("spawn")
            self._pool = [self._spawn(ctx, i, n) for i in range(n)]

    def call(self, target: str, *args: Any) -> Any:
        """``module:function(*args)`` run in the first worker, where the code is imported once for the jobs too (a
        driver plans there, so that it never imports torch & co. itself); what the function printed is printed
        here and an exception it raised is raised here; :class:`WorkerLost` if the worker died."""
        self.start()
        w = self._pool[0]  # type: ignore[index]
        try:
            w.conn.send(("call", target, args))
            ok, value, text = w.conn.recv()
        except (EOFError, OSError):
            w.process.join(timeout=5)
            raise WorkerLost(f"worker {w.process.pid} died before answering ({describe_exit(w.process.exitcode)})")
        w.used = True
        if text:
            sys.stdout.write(text)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        for w in self._pool or []:  # all at once, then wait for each
            w.ask_to_stop()
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
                        w.used, w.sent = True, time.time()
                        try:
                            w.conn.send(("job", asdict(w.job), self._threads(workers, len(pending))))
                        except OSError:  # it died just now: _poll reports the job's worker as dead
                            pass
                busy = [w for w in workers if w.job is not None]
                wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for w in busy:
                    result = self._poll(w)
                    if result is None:
                        continue
                    ok, msg, timing = result
                    job, attempt = w.job, w.attempt
                    w.job = None
                    self.job_times.append(dict(name=job.name, sent=w.sent, worker=w.process.pid,
                                               **(timing or {"began": w.sent, "ended": time.time()})))
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
        lone job, e.g. a stacked λ-sweep or a sweep's last job, gets the cores of idle workers); at most
        ``OMP_NUM_THREADS`` (:func:`thread_cap`)."""
        busy = sum(w.job is not None for w in workers)  # the job being sent is already assigned
        return thread_cap(max(1, (os.cpu_count() or 1) // max(1, min(len(workers), busy + pending))))

    @staticmethod
    def _poll(w: _Worker) -> Optional[tuple[bool, Any, Optional[dict[str, float]]]]:
        """The finished job's (ok, message, ``{"began", "ended"}`` in the worker), a :class:`_Died` message (no
        times) if the worker died, None if still busy."""
        try:
            if w.conn.poll():
                ok, msg, seconds, began = w.conn.recv()
                return ok, msg, {"began": began, "ended": began + seconds}
        except (EOFError, OSError):  # the worker closed its end: it is exiting
            w.process.join(timeout=30)
        if w.process.is_alive():
            return None
        w.process.join()
        w.conn.close()
        return False, _Died(f"worker died ({describe_exit(w.process.exitcode)})"), None


class _Died(str):
    """Failure message of a job whose worker process died."""
