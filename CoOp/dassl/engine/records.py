"""Structured run records: ``record.json`` (config, identity, seed, metrics, timings, versions) then ``done``.

Both are written atomically, record first; collectors only trust a run directory that has ``done``, and sweeps
count it as the planned run only when its fingerprint is the planned one (:func:`is_done`).
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

from ..utils.tools import atomic_write_json, atomic_write_text, read_json, versions
from .identity import stored_identity

RECORD_FILE = "record.json"
DONE_FILE = "done"
SCHEMA_VERSION = 1


class RunRecord:
    """Accumulates what a run measured; :meth:`write` stores it in the run directory."""

    def __init__(self, cfg_dict: dict[str, Any], args: Optional[dict[str, Any]] = None, mode: str = "train") -> None:
        self.data: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "mode": mode,
            "trainer": cfg_dict.get("TRAINER", {}).get("NAME", ""),
            "dataset": cfg_dict.get("DATASET", {}).get("NAME", ""),
            "backbone": cfg_dict.get("MODEL", {}).get("BACKBONE", {}).get("NAME", ""),
            "seed": cfg_dict.get("SEED"),
            "shots": cfg_dict.get("DATASET", {}).get("NUM_SHOTS"),
            "test_env": cfg_dict.get("TEST_ENV", ""),
            "config": cfg_dict,
            "args": args or {},
            "metrics": {},
            "timings": {},
            "versions": versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self._t0 = time.time()
        self._earlier_seconds = 0.0  # training segments before this process (a resumed run)

    def set_identity(self, identity: dict[str, Any]) -> None:
        """The run's identity (:mod:`dassl.engine.identity`): fingerprint and fingerprinted values."""
        self.data["identity"] = identity
        self.data["fingerprint"] = identity["fingerprint"]

    def set_segments(self, segments: list[dict[str, Any]]) -> None:
        """The training segments of a resumed run (one per process that trained it, oldest first): ``started``
        becomes the first segment's start and ``timings.total_seconds`` adds the earlier segments' seconds."""
        self.data["segments"] = segments
        if len(segments) > 1:
            self.data["started"] = segments[0]["started"]
            self._earlier_seconds = sum(float(s.get("seconds", 0.0)) for s in segments[:-1])

    def add_metrics(self, section: str, values: dict[str, Any]) -> None:
        self.data["metrics"].setdefault(section, {}).update({k: _plain(v) for k, v in values.items()})

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    def write(self, output_dir: str) -> str:
        self.data["timings"]["total_seconds"] = round(time.time() - self._t0 + self._earlier_seconds, 3)
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        path = os.path.join(output_dir, RECORD_FILE)
        atomic_write_json(path, self.data)
        atomic_write_text(os.path.join(output_dir, DONE_FILE), self.data["finished"] + "\n")
        return path


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    try:
        return float(v) if not isinstance(v, (str, bool, int, list)) and v is not None else v
    except (TypeError, ValueError):
        return str(v)


def is_done(run_dir: str, fingerprint: Optional[str] = None) -> bool:
    """This run finished: ``done`` and ``record.json`` exist and, when ``fingerprint`` is given, the directory's
    run has that fingerprint (a finished run of another configuration is not this run)."""
    if not (os.path.isfile(os.path.join(run_dir, DONE_FILE)) and os.path.isfile(os.path.join(run_dir, RECORD_FILE))):
        return False
    if fingerprint is None:
        return True
    stored = stored_identity(run_dir)
    return stored is not None and stored.get("fingerprint") == fingerprint


def load_record(run_dir: str) -> dict[str, Any]:
    return read_json(os.path.join(run_dir, RECORD_FILE))
