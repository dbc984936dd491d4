"""Process helpers for fault tests: run ``train.cli`` in a forked child (no interpreter start-up), kill -9.

The forked child is the real process doing the work (no wrapper shell), so ``kill -9`` hits it directly.
The child runs torch with one intra-op thread: the parent's OpenMP pool does not survive ``fork`` and a
parallel region entered in the child would wait forever on its lost threads.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from helpers import COOP


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def _child(target: Callable[[], int], out_path: str, err_path: str) -> None:
    code = 1
    try:
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.environ["CROFT_NO_PROGRESS"] = "1"
        import torch

        torch.set_num_threads(1)
        os.chdir(COOP)
        code = int(target() or 0)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # a traceback here is a test failure the parent sees on stderr
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def start_forked(target: Callable[[], int], workdir: str, tag: str = "run") -> tuple[int, str, str]:
    """Fork a child running ``target()`` in ``CoOp/`` with stdout/stderr to files; return (pid, out, err)."""
    out_path = os.path.join(workdir, f".{tag}.{time.monotonic_ns()}.out")
    err_path = out_path[:-4] + ".err"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(target, out_path, err_path)
    return pid, out_path, err_path


def wait_forked(pid: int, out_path: str, err_path: str, timeout: float = 300) -> Result:
    t0 = time.time()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child {pid} still running after {timeout} s")
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    texts = []
    for p in (out_path, err_path):
        if not os.path.exists(p):  # killed before it opened its output files (a marker that already existed)
            texts.append("")
            continue
        with open(p, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
        os.unlink(p)
    return Result(code, texts[0], texts[1])


def run_train_forked(argv: Sequence[str], workdir: str, timeout: float = 300) -> Result:
    """``python train.py ARGV`` as a forked child of this (already warmed-up) interpreter."""
    def target() -> int:
        import train

        return train.cli(list(argv))

    return wait_forked(*start_forked(target, workdir), timeout=timeout)


def kill_after(pid: int, delay: float) -> bool:
    """SIGKILL ``pid`` after ``delay`` seconds; False if it had already exited."""
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (read from /proc; the child is not reaped here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_when(pid: int, ready: Callable[[], bool], delay: float = 0.0, timeout: float = 300) -> bool:
    """SIGKILL ``pid`` ``delay`` s after ``ready()`` first holds; False if it had finished before."""
    t0 = time.time()
    while not ready():
        if not _running(pid) or time.time() - t0 > timeout:
            return False
        time.sleep(0.01)
    time.sleep(delay)
    if not _running(pid):
        return False
    os.kill(pid, signal.SIGKILL)
    return True


def run_until_done(start: Callable[[], tuple[int, str, str]], kills: int, max_delay: float, seed: int,
                   timeout: float = 600) -> tuple[int, Result]:
    """Start, kill -9 at ``kills`` random points (uniform in [0.3, max_delay] s), then run to the end.

    Returns (kills that hit a live process, the final run's result).
    """
    rng = random.Random(seed)
    hits = 0
    for _ in range(kills):
        pid, out, err = start()
        alive = kill_after(pid, rng.uniform(0.3, max_delay))
        res = wait_forked(pid, out, err, timeout=timeout)
        hits += int(alive and res.returncode == -signal.SIGKILL)
    return hits, wait_forked(*start(), timeout=timeout)


def popen_killable(cmd: Sequence[str], cwd: str = COOP, env: Optional[dict] = None) -> subprocess.Popen:
    """A real child process (argv list, no shell) whose pid is the process doing the work."""
    return subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def train_starter(argv: Sequence[str], workdir: str) -> Callable[[], tuple[int, str, str]]:
    """A ``start`` for :func:`run_until_done`: fork ``train.cli(argv)``."""
    def target() -> int:
        import train

        return train.cli(list(argv))

    return lambda: start_forked(target, workdir)
