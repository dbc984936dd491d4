"""Per-process memo of expensive, read-only resources, for persistent sweep workers (off by default).

A worker (``launch.workers``) calls :func:`enable`; afterwards :func:`memo` returns the value cached under a key
instead of recomputing it (e.g. a dataset's split lists, read and checked). Every key includes what identifies
the file (path, size, mtime), so a changed file is read again; values must not consume random numbers (a memo
hit would shift the run's random stream). Plain ``train.py`` runs never enable it.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

_ENABLED = False
_CACHE: dict[Hashable, Any] = {}


def enable(on: bool = True) -> None:
    """Turn memoisation on (or off, which also empties the memo)."""
    global _ENABLED
    _ENABLED = on
    if not on:
        _CACHE.clear()


def enabled() -> bool:
    return _ENABLED


def memo(key: Hashable, make: Callable[[], Any]) -> Any:
    """``make()`` once per key while enabled; always ``make()`` when disabled."""
    if not _ENABLED:
        return make()
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]
