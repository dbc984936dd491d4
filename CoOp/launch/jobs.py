"""A sweep job: one ``train.py`` invocation, the run directories it writes and how collectors label them.

Shared by the drivers (:mod:`launch.sweep`) and the launchers (:mod:`launch.launchers`, :mod:`launch.workers`,
:mod:`launch.slurm`); it imports nothing else of ``launch``, so the launchers and the sweep logic do not import
each other. It imports only the standard library at load time (a worker sets its device before torch loads).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """One ``train.py`` invocation and how collectors should label it.

    ``parts``: the runs of a job that writes several run directories (``train.py --eval-open-set``, or a stack of
    runs trained as one with ``train.py --member``), each a dict with ``name``, ``output_dir``, ``labels`` (and
    ``fingerprint``); the manifest lists them one by one and the job is done when they all are. Empty: the job is
    the one run ``name``/``output_dir``/``labels``/``fingerprint``.

    ``fingerprint``: the planned run's (:mod:`launch.runid`); a run counts as done only when its directory's
    ``done`` belongs to it. Empty (a job nobody resolved): any finished run counts.
    """

    name: str
    output_dir: str
    argv: list[str]
    labels: dict[str, Any] = field(default_factory=dict)
    parts: list[dict[str, Any]] = field(default_factory=list)  # an evaluation pass or a stack: its runs
    fingerprint: str = ""

    def runs(self) -> list[dict[str, Any]]:
        """The runs (name, output_dir, labels, fingerprint) the manifest lists for this job."""
        return self.parts or [{"name": self.name, "output_dir": self.output_dir, "labels": self.labels,
                               "fingerprint": self.fingerprint}]

    def run_dirs(self) -> list[str]:
        """Every run directory this job writes."""
        return [r["output_dir"] for r in self.parts] or [self.output_dir]

    def runs_done(self) -> int:
        from dassl.engine.records import is_done

        return sum(is_done(r["output_dir"], r.get("fingerprint") or None) for r in self.runs())

    def done(self) -> bool:
        return self.runs_done() == len(self.run_dirs())

    def command(self) -> list[str]:
        return [sys.executable, "train.py", *self.argv]
