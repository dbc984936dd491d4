"""Run identity: a fingerprint of everything in a run's config that can change its result.

A run directory holds ``identity.json`` (written at start, before any checkpoint) and the same block in
``record.json``: ``fingerprint`` (16 hex digits of a sha256), ``fingerprinted`` (the config values it covers, so
a difference can be explained key by key), ``mode`` and, for evaluation runs, the ``model`` evaluated (the training
run's identity, shots included) and ``load_epoch``. Sweeps count a directory as done only when its ``done`` marker
belongs to the planned fingerprint; ``train.py`` resumes only from checkpoints of its own fingerprint.

Not fingerprinted: the keys of :data:`NOT_FINGERPRINTED` (each with the reason), library versions and the code's
git revision (recorded in ``versions``: an upgrade or an edit must not invalidate every finished run and every
checkpoint of a sweep), the content of the data and weight files. Path-valued keys of :data:`PATH_KEYS` enter by
file name, so moving a file does not change the run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Optional

from yacs.config import CfgNode as CN

from ..config.checks import differing_keys
from ..utils.tools import atomic_write_json, read_json

IDENTITY_FILE = "identity.json"
SCHEME = 1

# key -> why it cannot change a number the run reports (the one place that lists them)
NOT_FINGERPRINTED: dict[str, str] = {
    "OUTPUT_DIR": "where the run is written",
    "RESUME": "where checkpoints are read from (their own fingerprint is checked)",
    "DATASET.ROOT": "where the data lies; the split files and images decide what is read",
    "FEATURE_CACHE.DIR": "where cached features lie; a store is keyed by what it holds",
    "DEVICE": "which device runs it (float rounding only; the record's precision block says what ran)",
    "USE_CUDA": "upstream compatibility key read by no code here (DEVICE decides)",
    "VERBOSE": "console output and progress bars",
    "TRAIN.PRINT_FREQ": "how often the progress line is printed",
    "TRAIN.TENSORBOARD": "extra TensorBoard logging",
    "TRAIN.CHECKPOINT_FREQ": "which per-epoch checkpoints stay on disk (every epoch is saved; saving draws no "
                             "random numbers)",
    "TEST.SAVE_SCORES": "whether scores.npz is written (metrics come from the same arrays)",
    "TEST.SAVE_PLOTS": "whether energy_hist.png is drawn",
    "PROTOCOL.PRESET": "the name of the plan a driver ran, not a setting (shell and Python drivers make one run)",
    "DATASET.VERIFY_IMAGES": "whether held-out/open-set images are decoded at start-up (a bad one stops the run)",
}
# path-valued keys that do change the result: they enter by file name ("random" and "" stay as they are)
PATH_KEYS = ("MODEL.BACKBONE.WEIGHTS", "MODEL.INIT_WEIGHTS")


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.get(part) if isinstance(tree.get(part), dict) else {}
    tree.pop(leaf, None)


def fingerprinted_values(cfg: Any) -> dict[str, Any]:
    """The config (a CfgNode or its ``cfg_to_dict`` form) as nested plain values, minus :data:`NOT_FINGERPRINTED`,
    path keys reduced to their file name."""
    tree = _plain(cfg)
    for key in NOT_FINGERPRINTED:
        _drop(tree, key)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node.get(part), dict) else {}
        if isinstance(node.get(leaf), str) and os.sep in node[leaf]:
            node[leaf] = os.path.basename(node[leaf].rstrip(os.sep))
    return tree


def _digest(body: Any) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_identity(cfg: Any, mode: str = "train", model: Optional[dict[str, Any]] = None,
                 load_epoch: Optional[int] = None) -> dict[str, Any]:
    """The identity of a run with config ``cfg``; evaluation runs add the evaluated ``model``'s identity (None:
    no trained model, e.g. zero-shot) and ``load_epoch``."""
    values = fingerprinted_values(cfg)
    body: dict[str, Any] = {"mode": mode, "config": values}
    ident: dict[str, Any] = {"scheme": SCHEME, "mode": mode}
    if mode == "eval":
        body["model"] = model.get("fingerprint") if model else None
        body["load_epoch"] = load_epoch
        ident["model"] = ({"fingerprint": model.get("fingerprint"), "fingerprinted": model.get("fingerprinted", {})}
                          if model else None)
        ident["load_epoch"] = load_epoch
    ident["fingerprint"] = _digest(body)
    ident["fingerprinted"] = values
    return ident


def partial_fingerprint(identity: dict[str, Any], drop: tuple[str, ...]) -> str:
    """A fingerprint of an identity without the dotted keys ``drop`` (also dropped from the evaluated model's):
    runs that differ only in those keys (e.g. seed and held-out domain, one row of a table) share it."""
    def strip(values: dict[str, Any]) -> dict[str, Any]:
        tree = json.loads(json.dumps(values))
        for key in drop:
            _drop(tree, key)
        return tree

    model = identity.get("model") or {}
    return _digest({"mode": identity.get("mode"), "config": strip(identity.get("fingerprinted", {})),
                    "model": strip(model.get("fingerprinted", {})) if model else None,
                    "load_epoch": identity.get("load_epoch")})


def stored_identity(run_dir: str) -> Optional[dict[str, Any]]:
    """The identity of what a directory holds: ``identity.json``; for directories written before run identities
    existed, a training run's from ``record.json`` or ``config.yaml``; None when nothing tells."""
    path = os.path.join(run_dir, IDENTITY_FILE)
    if os.path.isfile(path):
        return read_json(path)
    record = os.path.join(run_dir, "record.json")
    if os.path.isfile(record):
        rec = read_json(record)
        if rec.get("identity"):
            return rec["identity"]
        return run_identity(rec.get("config", {})) if rec.get("mode") == "train" else None
    cfg_file, args_file = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "args.json")
    if os.path.isfile(cfg_file) and os.path.isfile(args_file) and not read_json(args_file).get("eval_only"):
        with open(cfg_file, encoding="utf-8") as f:
            return run_identity(CN.load_cfg(f))
    return None


def write_identity(run_dir: str, identity: dict[str, Any]) -> None:
    atomic_write_json(os.path.join(run_dir, IDENTITY_FILE), identity)


def _value(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "<unset>"
        tree = tree[part]
    return tree


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = differing_keys(CN(old), CN(new))
    return [f"{prefix}{k}: {_value(old, k)!r} -> {_value(new, k)!r}" for k in keys]


def differences(old: Optional[dict[str, Any]], new: dict[str, Any]) -> list[str]:
    """``KEY: old -> new`` for every fingerprinted value two identities differ in (dotted keys; the evaluated
    model's keys prefixed ``model.``)."""
    if old is None:
        return ["<no recorded identity> -> " + new["fingerprint"]]
    out = [] if old.get("mode") == new.get("mode") else [f"mode: {old.get('mode')!r} -> {new.get('mode')!r}"]
    out += _config_changes(old.get("fingerprinted", {}), new.get("fingerprinted", {}))
    om, nm = old.get("model") or {}, new.get("model") or {}
    if om.get("fingerprint") != nm.get("fingerprint"):
        changes = _config_changes(om.get("fingerprinted", {}), nm.get("fingerprinted", {}), "model.")
        out += changes or [f"model: {om.get('fingerprint')} -> {nm.get('fingerprint')}"]
    if old.get("load_epoch") != new.get("load_epoch"):
        out.append(f"load_epoch: {old.get('load_epoch')!r} -> {new.get('load_epoch')!r}")
    if not out and old.get("fingerprint") != new.get("fingerprint"):
        out.append(f"fingerprint: {old.get('fingerprint')} -> {new.get('fingerprint')}")
    return out


def describe(changes: list[str], limit: int = 4) -> str:
    """A one-line summary of :func:`differences`."""
    more = f", ... ({len(changes) - limit} more)" if len(changes) > limit else ""
    return ", ".join(changes[:limit]) + more


# ------------------------------------------------------------------------------------- what a directory holds
def checkpoint_dirs(run_dir: str) -> list[str]:
    """The model folders of a run directory that hold checkpoints (``checkpoint`` or ``model*.pth.tar*`` files)."""
    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and any(f == "checkpoint" or f.startswith("model") and ".pth.tar" in f
                                       for f in os.listdir(path)):
            out.append(path)
    return out


def holds_run(run_dir: str) -> bool:
    """Whether a directory holds a finished run or checkpoints of one (something a new run must not mix with)."""
    return os.path.isfile(os.path.join(run_dir, "done")) or bool(checkpoint_dirs(run_dir))


# what a run writes, removed by :func:`replace_run` after ``done`` and ``record.json`` (identity.json last)
RUN_FILES = ("scores.npz", "energy_hist.png", "class_split.json", "log.txt", "config.yaml", "args.json")


def replace_run(run_dir: str) -> None:
    """Delete the run a directory holds so that another run can take it: ``done`` first (a kill at any point
    leaves no ``done``), then ``record.json``, the checkpoint folders, ``tensorboard/``, :data:`RUN_FILES` and
    ``identity.json`` last. Other files are left alone."""
    for name in ("done", "record.json"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            os.unlink(path)
    for folder in checkpoint_dirs(run_dir) + [os.path.join(run_dir, "tensorboard")]:
        shutil.rmtree(folder, ignore_errors=True)
    for name in RUN_FILES + (IDENTITY_FILE,):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            os.unlink(path)
