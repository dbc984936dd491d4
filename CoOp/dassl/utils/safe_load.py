"""Files are data, never code: every checkpoint, cache entry and CLIP state dict is read with
``torch.load(weights_only=True)``.

The weights-only unpickler accepts tensors, numbers, strings, ``None`` and plain containers, plus exactly the
extra types this project itself has written: numpy arrays (numpy's legacy RNG state inside the checkpoints'
``rng_state``). OpenAI's TorchScript archives are recognised from their zip listing (a ``constants.pkl``
record; nothing is unpickled to tell) and read only through ``torch.jit.load``. Anything else is refused with
one line naming the file, unless the user trusts it explicitly: ``train.py --trust-pickle`` or the environment
variable ``CROFT_TRUST_PICKLE=1`` (then the file is unpickled in full, with a warning line naming it).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import re
import warnings
import zipfile
from typing import Any, Iterator

from .errors import UserError

TRUST_ENV = "CROFT_TRUST_PICKLE"
_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("croft_trust_pickle", default=False)


class UnsafeFileError(UserError):
    """A file that would run code (or build objects other than data) when unpickled."""


def pickle_trusted() -> bool:
    """True inside :func:`trusting_pickle` or when ``CROFT_TRUST_PICKLE`` is set to a non-empty value but 0."""
    return _TRUSTED.get() or os.environ.get(TRUST_ENV, "").strip() not in ("", "0")


@contextlib.contextmanager
def trusting_pickle(trust: bool = True) -> Iterator[None]:
    """Within the block, files refused by the weights-only reader are unpickled in full when ``trust``."""
    token = _TRUSTED.set(bool(trust) or _TRUSTED.get())
    try:
        yield
    finally:
        _TRUSTED.reset(token)


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
    :class:`UnsafeFileError` naming it (or, when trusted, a full unpickle with a warning line); a file that
    cannot be read at all is a :class:`UserError` naming it."""
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
    if not pickle_trusted():
        raise UnsafeFileError(f"refusing to unpickle {what} {path}: it holds code or objects other than data "
                              f"({reason}); if you trust this file, pass --trust-pickle or set {TRUST_ENV}=1")
    print(f"WARNING: unpickling {what} {path} in full (trusted by --trust-pickle / {TRUST_ENV}): {reason}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # e.g. a truncated pickle
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read {what} {path}: {first}") from None


def load_torchscript_state_dict(path: str) -> dict[str, Any]:
    """The parameters and buffers of a TorchScript archive, read with ``torch.jit.load`` (no Python unpickling)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(torch.jit.load(path, map_location="cpu").state_dict())
