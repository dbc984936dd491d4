"""The names a sweep driver accepts, checked before anything is planned: one line per bad name.

A bad ``--domains`` / ``--datasets`` / ``--ood`` / ``--cfgs`` / ``--trainer`` value is refused with the valid
choices and the nearest one (``skech`` -> ``sketch``), instead of being planned into runs that all fail.
The choices come from the files the drivers read: ``configs/trainers/<trainer>/<cfg>.yaml``,
``configs/datasets/<dataset>[_<ood>].yaml`` and the official (or discovered) held-out domains.
"""
from __future__ import annotations

import difflib
import os
from typing import Iterable, Optional, Sequence

from launch.entry import COOP_DIR


def near_miss(value: str, choices: Sequence[str]) -> Optional[str]:
    """The choice closest to ``value`` (case-insensitive), or None when none is close."""
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(value.lower(), list(lower), n=1, cutoff=0.6)
    return lower[close[0]] if close else None


def unknown_name(flag: str, value: str, choices: Sequence[str], what: str) -> str:
    """The one-line error for ``value`` given to ``flag`` that is not one of ``choices``."""
    hint = near_miss(value, choices)
    listed = ", ".join(choices) if choices else "none found"
    return (f"error: {flag} {value!r} is not {what} (choose from {listed})"
            + (f"; did you mean {hint!r}?" if hint else ""))


def check_names(flag: str, values: Optional[Iterable[str]], choices: Sequence[str], what: str) -> None:
    """SystemExit with :func:`unknown_name`'s line for the first of ``values`` not in ``choices``."""
    for value in values or ():
        if value not in choices:
            raise SystemExit(unknown_name(flag, value, choices, what))


def _stems(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def trainer_names() -> list[str]:
    """Trainers a driver can plan: those with a ``configs/trainers/<name>/`` folder."""
    folder = os.path.join(COOP_DIR, "configs", "trainers")
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def cfg_names(trainer: str) -> list[str]:
    """The trainer's config names (``configs/trainers/<trainer>/<cfg>.yaml``)."""
    return _stems(os.path.join(COOP_DIR, "configs", "trainers", trainer))


def dataset_config_names() -> list[str]:
    """Every ``configs/datasets/<name>.yaml``."""
    return _stems(os.path.join(COOP_DIR, "configs", "datasets"))


def open_set_names(dataset: str) -> list[str]:
    """Open-set datasets of ``dataset``: the ``<OOD>`` of every ``configs/datasets/<dataset>_<OOD>.yaml``."""
    prefix = dataset + "_"
    return [n[len(prefix):] for n in dataset_config_names() if n.startswith(prefix)]


def check_trainers_and_cfgs(trainers: Sequence[str], cfgs: Optional[Sequence[str]]) -> None:
    """``--trainer`` names, then ``--cfgs`` against each trainer's configs."""
    check_names("--trainer", trainers, trainer_names(), "a trainer")
    for trainer in trainers:
        check_names("--cfgs", cfgs, cfg_names(trainer), f"a {trainer} config")
