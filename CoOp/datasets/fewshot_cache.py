"""CoOp's few-shot split caches, ``<dataset folder>/split_fewshot/shot_<K>-seed_<SEED>.pkl``, read and written
so that they are shared both ways with CoOp's and the official CRoFT code's dataset classes.

The file is a pickle (upstream writes it with ``pickle.HIGHEST_PROTOCOL``) of ``{"train": [Datum, ...], "val":
[Datum, ...]}``. Reading builds nothing but :class:`Datum` objects (files are data, never code): a file holding
any other object is refused with one line naming it (nothing in it runs; delete it to draw again). Writing pickles :class:`Datum` as it always pickles: the
official layout, the instance dict ``_impath``, ``_label``, ``_domain``, ``_classname``, ``_domainname``,
``_alldomain`` (the official DataManager reads ``domainname`` of every item; upstream Dassl ignores the two extra
attributes).
"""
from __future__ import annotations

import os
import pickle
from typing import Any

from dassl.data.datasets import Datum
from dassl.data.datasets.checks import check_files_exist
from dassl.utils.errors import DataError
from dassl.utils.safe_load import UnsafeFileError
from dassl.utils.tools import atomic_write_bytes

CACHE_DIR = "split_fewshot"
DATUM_GLOBAL = ("dassl.data.datasets.base_dataset", "Datum")  # upstream's and this project's module path
CACHE_KEYS = ("train", "val")


def cache_path(dataset_root: str, num_shots: int, seed: int) -> str:
    """``<dataset_root>/split_fewshot/shot_<K>-seed_<SEED>.pkl`` (CoOp's name; the seed is ``cfg.SEED``)."""
    return os.path.join(dataset_root, CACHE_DIR, f"shot_{int(num_shots)}-seed_{int(seed)}.pkl")


class _Refused(pickle.UnpicklingError):
    """A global other than ``Datum`` in the file."""


class _DatumUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == DATUM_GLOBAL:
            return Datum
        raise _Refused(f"unsupported GLOBAL {module}.{name}")


def _unpickle(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return _DatumUnpickler(f).load()
    except _Refused as err:
        reason = str(err)
    except Exception as err:  # truncated or not a pickle
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot read the few-shot cache {path}: {first} (delete it to draw again)") from None
    raise UnsafeFileError(f"refusing to unpickle the few-shot cache {path}: it holds objects other than Datum "
                          f"({reason}); nothing in it ran; delete it to draw again")


def read_cache(path: str, image_dir: str = "") -> tuple[list[Datum], list[Datum]]:
    """``(train, val)`` of a few-shot cache (see the module docstring). A file that is not ``{"train": [Datum],
    "val": [Datum]}`` or lists an image that does not exist is a :class:`DataError` naming it."""
    data = _unpickle(path)
    ok = isinstance(data, dict) and all(isinstance(data.get(k), list) for k in CACHE_KEYS)
    if not ok or not all(isinstance(d, Datum) for k in CACHE_KEYS for d in data[k]):
        raise DataError(f"the few-shot cache {path} is not a {{'train': [Datum, ...], 'val': [Datum, ...]}} "
                        f"pickle (delete it to draw again)")
    try:
        check_files_exist({k: data[k] for k in CACHE_KEYS}, f"few-shot cache {path}", image_dir)
    except DataError as err:
        raise DataError(f"{err} (the cache was written for other image paths; delete it to draw again)") from None
    return list(data["train"]), list(data["val"])


def write_cache(path: str, train: list[Datum], val: list[Datum]) -> bool:
    """Write ``{"train": train, "val": val}`` atomically in upstream's layout; ``False`` (and a note) when the
    folder cannot be written (the caller still uses its draw)."""
    data = pickle.dumps({"train": list(train), "val": list(val)}, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        print(f"Note: cannot write the few-shot cache {path} ({err}); this run uses its own draw")
        return False
    print(f"Saved the few-shot cache {path}")
    return True
