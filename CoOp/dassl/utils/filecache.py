"""Small JSON caches of facts about files, keyed by (path, size, mtime): a fact is computed once per file version.

They live under :func:`cache_root` (``$CROFT_CACHE_DIR``, default ``~/.cache/croft``). A cache file is read
whole and rewritten atomically, merged with what other processes wrote in the meantime; an unreadable cache
is ignored (the facts are recomputed). Used for the sha256 of CLIP weights (provenance) and for the image
checks of :mod:`dassl.data.verify`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

from .tools import atomic_write_text, sha256_file

CACHE_ENV = "CROFT_CACHE_DIR"
_SHA_MEMO: dict[tuple, str] = {}


def cache_root() -> str:
    """``$CROFT_CACHE_DIR`` or ``~/.cache/croft``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "croft")


def file_version(path: str) -> list[Any]:
    """``[size, mtime_ns]`` of a file (what a cached fact is valid for)."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def read_cache(path: str) -> dict[str, Any]:
    """The entries of a cache file (``{}`` when absent or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if isinstance(data, dict) else {}


def update_cache(path: str, entries: dict[str, Any], about: str = "") -> None:
    """Merge ``entries`` into the cache file (atomic rewrite); a cache that cannot be written is skipped."""
    if not entries:
        return
    merged = read_cache(path)
    merged.update(entries)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps({"about": about, "entries": merged}, sort_keys=True) + "\n")
    except OSError as err:
        print(f"Note: cannot write the cache {path} ({err}); the check is repeated next time")


def cached_sha256(path: str, cache_file: Optional[str] = None) -> str:
    """sha256 of a file, computed once per (real path, size, mtime) and kept in ``<cache_root>/sha256.json``."""
    real = os.path.realpath(path)
    version = file_version(real)
    key = (real, *version)
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    cache_file = cache_file or os.path.join(cache_root(), "sha256.json")
    hit = read_cache(cache_file).get(real)
    if isinstance(hit, dict) and hit.get("version") == version and isinstance(hit.get("sha256"), str):
        digest = hit["sha256"]
    else:
        digest = sha256_file(real)
        update_cache(cache_file, {real: {"version": version, "sha256": digest}},
                     about="sha256 of files by real path, valid for version = [size, mtime_ns]")
    _SHA_MEMO[key] = digest
    return digest


def tree_cache_file(kind: str, tree: str) -> str:
    """``<cache_root>/<kind>/<16 hex of the tree's real path>.json``: one cache file per folder tree."""
    digest = hashlib.sha1(os.path.realpath(tree).encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_root(), kind, f"{digest}.json")
