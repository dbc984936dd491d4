"""Append-only, sharded feature store: ``impath -> feature`` for one (backbone key, transform, view).

A store is a folder of shards. Each addition writes one new shard and never touches the others, so the cost of
an insertion depends only on its own size, not on the size of the store:

* ``<stem>.npy``  the N x D float32 features (read through a memory map, never loaded whole);
* ``<stem>.json`` the shard's index, ``{"paths": [...], "dim": D}``; written last, it *commits* the shard.

Both files are written to a temp name and renamed, and a reader only looks at shards whose index exists, so a
writer killed at any point leaves no visible partial shard (at most a ``.tmp-*`` file or an uncommitted ``.npy``,
ignored by readers and removed by the next writer). Additions take an exclusive ``fcntl`` lock on ``.lock``, re-read the index of shards written
meanwhile and skip paths already stored, so concurrent writers never store a path twice. Shard stems carry the
writer's name (``r<rank>-<host>-<pid>``), so ranks under ``torchrun`` write disjoint shards.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import uuid
from typing import Any, Iterable, Optional

import numpy as np

INDEX_SUFFIX = ".json"


def default_writer_name() -> str:
    """``r<rank>-<host>-<pid>``: unique per process, and per rank under torchrun."""
    return f"r{int(os.environ.get('RANK', 0))}-{socket.gethostname()}-{os.getpid()}"


def _write_atomic(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class FeatureStore:
    """One store folder; ``add`` appends a shard, ``get``/``in`` read through the in-memory path index."""

    def __init__(self, folder: str, writer: Optional[str] = None) -> None:
        self.folder = folder
        self.writer = writer or default_writer_name()
        self._where: dict[str, tuple[int, int]] = {}  # impath -> (shard number, row)
        self._stems: list[str] = []
        self._arrays: list[Optional[np.ndarray]] = []
        self._known: set[str] = set()
        self.refresh()

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Index the shards committed since the last call (only their small index files are read)."""
        if not os.path.isdir(self.folder):
            return
        for name in sorted(os.listdir(self.folder)):
            if not name.endswith(INDEX_SUFFIX) or name.startswith("."):
                continue
            stem = name[: -len(INDEX_SUFFIX)]
            if stem in self._known:
                continue
            with open(os.path.join(self.folder, name)) as f:
                paths = json.load(f)["paths"]
            self._known.add(stem)
            k = len(self._stems)
            self._stems.append(stem)
            self._arrays.append(None)
            for row, p in enumerate(paths):
                self._where.setdefault(p, (k, row))

    def _array(self, k: int) -> np.ndarray:
        arr = self._arrays[k]
        if arr is None:
            path = os.path.join(self.folder, self._stems[k] + ".npy")
            try:  # a plain float array: np.load refuses pickled objects (allow_pickle=False)
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                if arr.dtype.hasobject or arr.ndim != 2:
                    raise ValueError(f"expected an N x D float array, got {arr.dtype} {arr.shape}")
            except (OSError, ValueError) as err:
                from ..utils.errors import DataError

                raise DataError(f"feature cache shard {path} is not a feature array ({err}); delete the "
                                f"folder {self.folder} to rebuild it") from None
            self._arrays[k] = arr
        return arr

    def __contains__(self, path: str) -> bool:
        return path in self._where

    def __len__(self) -> int:
        return len(self._where)

    @property
    def num_shards(self) -> int:
        return len(self._stems)

    def get(self, path: str) -> Any:
        """The stored feature of ``path`` as a torch tensor (a copy of one memory-mapped row)."""
        import torch

        k, row = self._where[path]
        return torch.from_numpy(np.array(self._array(k)[row]))

    def to_arrays(self) -> tuple[list[str], np.ndarray]:
        """All (paths sorted, N x D features): for inspection and tests, loads everything."""
        paths = sorted(self._where)
        if not paths:
            return [], np.zeros((0, 0), dtype=np.float32)
        return paths, np.stack([np.asarray(self._array(k)[r]) for k, r in (self._where[p] for p in paths)])

    # ------------------------------------------------------------------ writing
    def add(self, paths: Iterable[str], feats: Any) -> int:
        """Append the rows (torch tensor or array) whose path is not stored yet as one new shard; returns how
        many were added."""
        paths = list(paths)
        feats = np.ascontiguousarray(feats.detach().cpu().float().numpy() if hasattr(feats, "detach")
                                     else np.asarray(feats, dtype=np.float32))
        if feats.ndim != 2 or feats.shape[0] != len(paths):
            raise ValueError(f"feature store {self.folder}: need one feature row per path, got {feats.shape} "
                             f"for {len(paths)} paths")
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._sweep_orphans()
                self.refresh()
                keep, seen = [], set()
                for i, p in enumerate(paths):
                    if p not in self._where and p not in seen:
                        keep.append(i)
                        seen.add(p)
                if keep:
                    self._write_shard([paths[i] for i in keep], feats[keep])
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return len(keep)

    def _sweep_orphans(self) -> None:
        """Remove what killed writers left (temp files, a shard whose index was never committed); called under
        the lock, when no other writer is writing."""
        names = set(os.listdir(self.folder))
        for name in names:
            orphan = name.endswith(".npy") and name[:-4] + INDEX_SUFFIX not in names
            if name.startswith(".tmp-") or orphan:
                try:
                    os.remove(os.path.join(self.folder, name))
                except FileNotFoundError:
                    pass

    def _write_shard(self, paths: list[str], feats: np.ndarray) -> None:
        stem = f"{self.writer}-{uuid.uuid4().hex[:12]}"
        _write_atomic(os.path.join(self.folder, stem + ".npy"), lambda f: np.save(f, feats))
        index = json.dumps({"paths": paths, "dim": int(feats.shape[1])}).encode()
        _write_atomic(os.path.join(self.folder, stem + INDEX_SUFFIX), lambda f: f.write(index))
        self.refresh()

    def import_legacy(self, pt_file: str) -> int:
        """Copy an old single-file store (``{"paths", "feats"}`` saved by ``torch.save``) in as one shard."""
        import torch

        try:
            obj = torch.load(pt_file, map_location="cpu", weights_only=True)
            paths, feats = list(obj["paths"]), obj["feats"]
        except Exception as err:
            raise ValueError(f"feature cache {pt_file}: unreadable old single-file store ({err}); delete it "
                             f"to rebuild the cache") from err
        return self.add(paths, feats)
