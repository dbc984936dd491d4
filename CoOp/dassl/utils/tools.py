"""Small helpers: seeding, device resolution, atomic file writes, environment info."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
import tempfile
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DataError


def mkdir_if_missing(dirname: str) -> None:
    os.makedirs(dirname, exist_ok=True)


def check_isfile(fpath: str) -> bool:
    return os.path.isfile(fpath)


def listdir_nohidden(path: str, sort: bool = False) -> list[str]:
    """List non-hidden entries of ``path`` (in ``os.listdir`` order unless ``sort``, as Dassl)."""
    items = [f for f in os.listdir(path) if not f.startswith(".")]
    return sorted(items) if sort else items


def read_json(fpath: str) -> Any:
    """Read a JSON file; a missing or malformed file is a :class:`DataError` naming the path."""
    if not os.path.isfile(fpath):
        raise DataError(f"missing file: {fpath}")
    try:
        with open(fpath, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON in {fpath}: {err}") from None


def write_json(obj: Any, fpath: str) -> None:
    """Write ``obj`` as JSON in Dassl's layout (indent 4), atomically; missing folders are created."""
    atomic_write_text(fpath, json.dumps(obj, indent=4, separators=(",", ": ")))


def atomic_write_bytes(fpath: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``fpath`` through a temp file in the same folder and ``os.replace`` (a killed process
    leaves the old file or the new one); ``durable``: ``fsync`` the data first (survives a power loss too)."""
    dirname = os.path.dirname(os.path.abspath(fpath))
    os.makedirs(dirname, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dirname)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, fpath)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(fpath: str, text: str, durable: bool = True) -> None:
    atomic_write_bytes(fpath, text.encode("utf-8"), durable)


def atomic_write_json(fpath: str, obj: Any) -> None:
    atomic_write_text(fpath, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def sha256_file(fpath: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(fpath, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def rng_state() -> tuple[Any, ...]:
    """The global python, numpy and torch random states (and CUDA's when available)."""
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: tuple[Any, ...]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state[3])


def set_random_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python ``random``, numpy's legacy global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(name: str) -> torch.device:
    """Map the ``DEVICE`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) to a :class:`torch.device`."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"DEVICE {name!r} requested but CUDA is not available (use DEVICE cpu or auto)")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"DEVICE {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    raise ConfigError(f"invalid DEVICE {name!r}: use auto, cpu, cuda or cuda:N")


def collect_env_info() -> str:
    """Short environment summary printed at the start of each run."""
    import torchvision

    lines = [
        f"Python: {sys.version.split()[0]} ({platform.platform()})",
        f"PyTorch: {torch.__version__}  torchvision: {torchvision.__version__}  numpy: {np.__version__}",
        f"CUDA available: {torch.cuda.is_available()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
    lines.append(f"Threads: {torch.get_num_threads()}")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """Library versions stored in every run record."""
    from importlib.metadata import PackageNotFoundError, version

    import torchvision

    try:  # read from the installed metadata: importing scikit-learn costs seconds per process
        sklearn_version = version("scikit-learn")
    except PackageNotFoundError:  # pragma: no cover
        sklearn_version = ""
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": np.__version__, "sklearn": sklearn_version}
    try:
        import open_clip

        out["open_clip"] = open_clip.__version__
    except Exception:  # pragma: no cover - optional at import time
        pass
    rev = git_revision()
    if rev:
        out["git"] = rev
    return out


def git_revision() -> str:
    """The project's git commit (``+dirty`` with local changes), or "" outside a checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def progress_enabled(verbose: bool = True) -> bool:
    """Progress bars are shown unless the run is quiet or ``CROFT_NO_PROGRESS`` is set (sweeps set it)."""
    return bool(verbose) and not os.environ.get("CROFT_NO_PROGRESS")
