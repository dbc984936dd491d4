"""Per-process memo of expensive, read-only resources, for persistent sweep workers (off by default).

A worker (``launch.workers``) calls :func:`enable`; afterwards :func:`memo` returns the value cached under a key
instead of recomputing it (e.g. a dataset's split lists, read and checked). Every key includes what identifies
the file (path, size, mtime), so a changed file is read again; values must not consume random numbers (a memo
hit would shift the run's random stream). Plain ``train.py`` runs never enable it.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

from .tools import rng_state, set_rng_state

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


def rng_fingerprint() -> str:
    """A digest of the global python / numpy / torch (CPU) random states."""
    import hashlib
    import pickle

    py, np_state, torch_state = rng_state()[:3]
    digest = hashlib.sha1(pickle.dumps(py))
    digest.update(pickle.dumps(np_state))
    digest.update(torch_state.numpy().tobytes())
    return digest.hexdigest()


def memo_rng(key: Hashable, make: Callable[[], Any], copy: Callable[[Any], Any], per_state: bool = False) -> Any:
    """Memo for values whose construction draws random numbers (e.g. a model initialised, then loaded).

    A hit needs the global random state a stored construction started from; the state is then set to where that
    construction left it, so a run's random stream is the one it would have had. Each caller gets ``copy(value)``
    (the stored value is never handed out). ``per_state``: the value itself depends on the random state (random
    weights), so one value is kept per starting state; otherwise one value per key. Disabled: ``make()``.
    """
    if not _ENABLED:
        return make()
    before = rng_fingerprint()
    vkey = ("memo_rng", key, before if per_state else None)
    skey = ("memo_rng_after", key, before)
    if vkey in _CACHE and skey in _CACHE:
        set_rng_state(_CACHE[skey])
        return copy(_CACHE[vkey])
    value = make()
    _CACHE[skey] = rng_state()
    _CACHE.setdefault(vkey, value)
    return copy(_CACHE[vkey])
