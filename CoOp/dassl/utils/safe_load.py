"""Files are data, never code: every checkpoint, cache entry and CLIP state dict is read with
``torch.load(weights_only=True)``.

The weights-only unpickler accepts tensors, numbers, strings, ``None`` and plain containers, plus exactly the
extra types this project itself has written: numpy arrays (numpy's legacy RNG state inside the checkpoints'
``rng_state``). OpenAI's TorchScript archives are recognised from their zip listing (a ``constants.pkl``
record; nothing is unpickled to tell) and read only through ``torch.jit.load``. Anything else is refused with
one line naming the file. Nothing here unpickles a file in full: a file that holds other objects as well (e.g.
an upstream Dassl checkpoint, whose scheduler state holds the successor scheduler object) is read by
:func:`read_data_only`, where each such object is left as an inert placeholder and nothing of it runs;
``python tools/data_only.py IN OUT`` writes the data of such a file as a file this module reads.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from typing import Any

from .errors import UserError


class UnsafeFileError(UserError):
    """A file that would run code (or build objects other than data) when unpickled."""


def _numpy_globals() -> list[Any]:
    """numpy's uint32 array reconstruction (under the module names numpy 2 and numpy 1 pickle it with)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    rebuild = core.multiarray._reconstruct
    return [(rebuild, "numpy._core.multiarray._reconstruct"), (rebuild, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]  # the legacy RNG state: a uint32 array


def is_torchscript_archive(path: str) -> bool:
    """An archive written by ``torch.jit.save`` (OpenAI's ``RN50.pt``): a zip with a top-level ``constants.pkl``.
    Only the zip's table of contents is read."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names)


def _refusal(message: str) -> str:
    """The unpickler's reason in a few words (e.g. ``unsupported GLOBAL posix.system``)."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"unsupported GLOBAL {found.group(1)}"
    found = re.search(r"Unsupported operand \d+", message)
    return found.group(0) if found else "objects other than tensors and plain containers"


def load_torch_file(path: str, what: str = "file", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (see the module docstring). A refused file is an
    :class:`UnsafeFileError` naming it and how to keep its data (:func:`read_data_only`); a file that cannot be
    read at all is a :class:`UserError` naming it."""
    import torch

    if is_torchscript_archive(path):
        raise UnsafeFileError(f"{what} {path} is a TorchScript archive, not a {what} written by torch.save")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_globals()):
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err) and "Weights only" not in str(err):
            raise UserError(f"cannot read {what} {path}: {str(err).splitlines()[0]}") from None
        reason = _refusal(str(err))
    except Exception as err:  # truncated / corrupt file
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read {what} {path}: {first}") from None
    raise UnsafeFileError(f"refusing to unpickle {what} {path}: it holds code or objects other than data "
                          f"({reason}); nothing in it ran. `python tools/data_only.py {path} OUT` writes its data "
                          f"only (tensors, numbers, strings, containers) to OUT")


class Inert:
    """What :func:`read_data_only` leaves in place of an object that is not data: the global's name, the
    arguments and state the file gave it (never called, never built)."""

    __slots__ = ("args", "state")

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<not built: {getattr(type(self), 'GLOBAL', '?')}>"


# containers that pickles build through a global: rebuilt as the plain containers they hold
_DATA_GLOBALS = {"builtins.dict": dict, "builtins.set": set, "builtins.frozenset": frozenset,
                 "builtins.list": list, "builtins.tuple": tuple, "collections.defaultdict": lambda *_: {}}


def _placeholder(name: str) -> Any:
    if name in _DATA_GLOBALS:
        return _DATA_GLOBALS[name]
    return type(f"Inert[{name}]", (Inert,), {"__slots__": (), "GLOBAL": name})


def read_data_only(path: str, map_location: Any = "cpu") -> tuple[Any, list[str]]:
    """``(object, globals left inert)`` of a ``torch.save`` file, read by the weights-only unpickler with every
    global it would refuse mapped to an :class:`Inert` placeholder (plain containers rebuilt as such): nothing in
    the file runs. A file that cannot be read is a :class:`UserError` naming it."""
    import torch

    if is_torchscript_archive(path):
        raise UnsafeFileError(f"{path} is a TorchScript archive, not a file written by torch.save")
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with warnings.catch_warnings(), torch.serialization.safe_globals(
                _numpy_globals() + [(_placeholder(n), n) for n in names]):
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # not a torch.save file, truncated, corrupt
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read {path}: {first}") from None
    return obj, [n for n in names if n not in _DATA_GLOBALS]


def data_of(obj: Any) -> Any:
    """``obj`` without its :class:`Inert` placeholders (dropped from containers); None when ``obj`` is one."""
    if isinstance(obj, Inert):
        return None
    if isinstance(obj, dict):
        return type(obj)((k, data_of(v)) for k, v in obj.items() if not isinstance(v, Inert))
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(data_of(v) for v in obj if not isinstance(v, Inert))
    return obj


def load_torchscript_state_dict(path: str) -> dict[str, Any]:
    """The parameters and buffers of a TorchScript archive, read with ``torch.jit.load`` (no Python unpickling)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(torch.jit.load(path, map_location="cpu").state_dict())
