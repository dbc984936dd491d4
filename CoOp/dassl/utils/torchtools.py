"""Checkpoint I/O (atomic writes, Dassl layout: ``<dir>/<model>/model.pth.tar-<E>`` and ``model-best.pth.tar``;
a ``checkpoint`` file names the newest ``model.pth.tar-<E>``, the rolling checkpoint resume starts from)."""
from __future__ import annotations

import io
import os
import random
import re
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError
from .safe_load import load_torch_file
from .tools import atomic_write_bytes, atomic_write_text


def save_checkpoint(state: dict[str, Any], save_dir: str, is_best: bool = False,
                    model_name: str = "") -> str:
    """Save ``state`` (keys: state_dict, epoch, optimizer, scheduler, ...) atomically.

    Writes ``model.pth.tar-<epoch>`` (or ``model_name`` if given) and, if ``is_best``, ``model-best.pth.tar``;
    a ``checkpoint`` text file names the latest regular checkpoint (used by resume). Every write is atomic (a
    killed process leaves the old file or the new one); ``model-best.pth.tar`` (what evaluation loads) is also
    ``fsync``'d, the rolling checkpoint and ``checkpoint`` are not: a power loss may lose the newest of them
    (resume then starts from an older readable checkpoint); :func:`sync_checkpoint` makes them durable.
    """
    os.makedirs(save_dir, exist_ok=True)
    state = dict(state)
    sd = state["state_dict"]
    state["state_dict"] = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in sd.items())
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    if is_best:
        fpath = os.path.join(save_dir, "model-best.pth.tar")
        atomic_write_bytes(fpath, data)
        return fpath
    name = model_name or f"model.pth.tar-{state['epoch']}"
    fpath = os.path.join(save_dir, name)
    atomic_write_bytes(fpath, data, durable=False)  # rewritten every epoch: kill-safe, not power-loss-safe
    atomic_write_text(os.path.join(save_dir, "checkpoint"), name + "\n", durable=False)
    return fpath


def sync_checkpoint(save_dir: str) -> list[str]:
    """``fsync`` the regular checkpoint ``<save_dir>/checkpoint`` names and that file (the end of training: a
    finished run's checkpoints survive a power loss); returns the paths synced."""
    pointer = os.path.join(save_dir, "checkpoint")
    if not os.path.isfile(pointer):
        return []
    with open(pointer, encoding="utf-8") as f:
        paths = [os.path.join(save_dir, f.readline().strip()), pointer]
    synced = []
    for path in paths:
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            synced.append(path)
    return synced


def set_latest_checkpoint(save_dir: str, name: str) -> None:
    """Make the ``checkpoint`` file of ``save_dir`` name ``name`` (atomic; unchanged when it already does)."""
    pointer = os.path.join(save_dir, "checkpoint")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            if f.readline().strip() == name:
                return
    atomic_write_text(pointer, name + "\n")


def prune_checkpoints(save_dir: str, keep_every: int = 0) -> list[str]:
    """Remove every ``model.pth.tar-<E>`` of ``save_dir`` but the one ``checkpoint`` names (the rolling last
    checkpoint) and, when ``keep_every`` > 0, those with ``E % keep_every == 0``; return the removed names."""
    pointer = os.path.join(save_dir, "checkpoint")
    if not os.path.isfile(pointer):
        return []
    with open(pointer, encoding="utf-8") as f:
        newest = f.readline().strip()
    removed = []
    for name in sorted(os.listdir(save_dir)):
        m = re.fullmatch(r"model\.pth\.tar-(\d+)", name)
        if m and name != newest and not (keep_every > 0 and int(m.group(1)) % keep_every == 0):
            os.unlink(os.path.join(save_dir, name))
            removed.append(name)
    return removed


def rng_to_tensors() -> dict[str, Any]:
    """The python, numpy and torch (and CUDA) global RNG states as tensors and numbers (weights-only loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def rng_from_tensors(rng: dict[str, Any]) -> None:
    """Restore what :func:`rng_to_tensors` saved (also the older layout with numpy's own state tuple)."""
    py, npy = rng["python"], rng["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    else:
        random.setstate(py)
    if isinstance(npy, dict):
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:
        np.random.set_state(npy)
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_checkpoint(fpath: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (weights only, :mod:`dassl.utils.safe_load`); a
    missing, unreadable or code-carrying file raises a one-line error naming it."""
    if not fpath or not os.path.isfile(fpath):
        raise UserError(f"checkpoint not found: {fpath}")
    return load_torch_file(fpath, "checkpoint", map_location)  # weights only: a file is data, never code


def resume_from_checkpoint(fdir: str, model: nn.Module, optimizer: Any = None, scheduler: Any = None) -> int:
    """Restore the latest checkpoint named in ``<fdir>/checkpoint``; return the epoch to start from."""
    with open(os.path.join(fdir, "checkpoint"), encoding="utf-8") as f:
        name = f.readline().strip()
    ckpt = load_checkpoint(os.path.join(fdir, name))
    model.load_state_dict(ckpt["state_dict"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    return int(ckpt["epoch"])


def load_pretrained_weights(model: nn.Module, weight_path: str) -> list[str]:
    """Load the layers of a state dict (optionally under ``state_dict``) that match ``model`` by name and shape.

    As Dassl: ``module.`` prefixes are stripped, mismatched layers are skipped with a printed list, and a file
    of which nothing matches gives a warning; returns the names of the discarded layers.
    """
    ckpt = load_checkpoint(weight_path)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    own = model.state_dict()
    matched, discarded = OrderedDict(), []
    for key, value in sd.items():
        key = key[7:] if key.startswith("module.") else key
        if key in own and hasattr(value, "size") and own[key].size() == value.size():
            matched[key] = value
        else:
            discarded.append(key)
    own.update(matched)
    model.load_state_dict(own)
    if not matched:
        warnings.warn(f'The pretrained weights "{weight_path}" cannot be loaded, please check the key names '
                      "manually (** ignored and continue **)")
    else:
        print(f'Successfully loaded pretrained weights from "{weight_path}"')
        if discarded:
            print(f"** The following layers are discarded due to unmatched keys or layer size: {discarded}")
    return discarded


def count_num_param(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
