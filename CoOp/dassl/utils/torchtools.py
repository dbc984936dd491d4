"""Checkpoint I/O (atomic writes, Dassl layout: ``<dir>/<model>/model.pth.tar-<E>`` and ``model-best.pth.tar``)."""
from __future__ import annotations

import io
import os
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from .errors import UserError
from .tools import atomic_write_bytes, atomic_write_text


def save_checkpoint(state: dict[str, Any], save_dir: str, is_best: bool = False,
                    model_name: str = "") -> str:
    """Save ``state`` (keys: state_dict, epoch, optimizer, scheduler, ...) atomically.

    Writes ``model.pth.tar-<epoch>`` (or ``model_name`` if given) and, if ``is_best``, ``model-best.pth.tar``;
    a ``checkpoint`` text file names the latest regular checkpoint (used by resume).
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
    atomic_write_bytes(fpath, data)
    atomic_write_text(os.path.join(save_dir, "checkpoint"), name + "\n")
    return fpath


def load_checkpoint(fpath: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; missing files raise a one-line error."""
    if not fpath or not os.path.isfile(fpath):
        raise UserError(f"checkpoint not found: {fpath}")
    try:
        return torch.load(fpath, map_location=map_location, weights_only=False)
    except Exception as err:  # corrupt / truncated file
        raise UserError(f"cannot read checkpoint {fpath}: {err}") from None


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
