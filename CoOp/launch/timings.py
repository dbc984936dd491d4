"""Where a driver command's seconds go: one summary line at its end, JSON with ``--timings FILE``.

Times are wall-clock (``time.time()``) from the moment the driver's ``main`` starts (the interpreter's start-up
and the driver's imports come before it): planning (resolving every run's fingerprint; the workers start
meanwhile), then per phase (training, evaluation) its wall time and, per job, when it was sent to a launcher,
began and ended (``launch.launchers.Launcher.job_times``).
"""
from __future__ import annotations

import time
from typing import Any, Optional


class CommandTimings:
    """Marks of one driver command (``started``, ``planned``, ``ended``) and its phases."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"started": time.time()}
        self.phases: list[dict[str, Any]] = []

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def add_phase(self, name: str, start: float, end: float, jobs: list[dict[str, Any]]) -> None:
        self.phases.append({"phase": name, "start": start, "end": end, "jobs": list(jobs)})

    def as_dict(self) -> dict[str, Any]:
        return {**self.marks, "phases": self.phases}

    def summary(self) -> Optional[str]:
        """``timings: ...`` (seconds since the driver started); None when no job ran."""
        if not any(p["jobs"] for p in self.phases):
            return None
        t0 = self.marks["started"]
        parts = [f"planning {self.marks.get('planned', t0) - t0:.1f} s (workers start meanwhile)"]
        for p in self.phases:
            running = sum(j["ended"] - j["began"] for j in p["jobs"])
            waiting = sum(max(0.0, j["began"] - j["sent"]) for j in p["jobs"])
            n = len(p["jobs"])
            parts.append(f"{p['phase']} {p['end'] - p['start']:.1f} s ({n} job{'s' * (n != 1)}: {running:.1f} s "
                         f"running" + (f", {waiting:.1f} s waiting for a worker to start" if waiting >= 0.05 else "")
                         + ")")
        end = self.marks.get("ended", time.time())
        return f"timings: {end - t0:.1f} s since the driver started: " + "; ".join(parts)

    def write(self, path: str) -> None:
        """The marks and phases as JSON, atomically (temp file + rename; the standard library only: a driver that
        planned in its workers has not imported ``dassl`` and its torch)."""
        import json
        import os
        import tempfile

        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.as_dict(), f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
