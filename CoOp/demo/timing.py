"""Per-stage timings of a demo run: wall-clock seconds per stage, and the CPU seconds of the whole run."""
from __future__ import annotations

import contextlib
import os
import resource
import time
from typing import Iterator


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have exited."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Stages:
    """Collects ``(name, wall seconds)`` per stage; :meth:`line` prints them with the total and the CPU load."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []
        self.notes: dict[str, str] = {}
        self._t0, self._cpu0, self._load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (also when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.rows.append((name, time.perf_counter() - t0))

    def note(self, name: str, text: str) -> None:
        """A remark printed after the stage's seconds, e.g. the encoder passes that filled the feature cache."""
        self.notes[name] = text

    def line(self) -> str:
        """``stage timings (wall s): data 20.1, ...; total 250.3 s wall, 480.2 s CPU, load average 1.1 -> 2.3``."""
        parts = [f"{n} {s:.1f}" + (f" ({self.notes[n]})" if n in self.notes else "") for n, s in self.rows]
        return (f"stage timings (wall s): {', '.join(parts)}; total {time.perf_counter() - self._t0:.1f} s wall, "
                f"{cpu_seconds() - self._cpu0:.1f} s CPU (this process and its exited workers), load average "
                f"{self._load0:.1f} -> {os.getloadavg()[0]:.1f}")
