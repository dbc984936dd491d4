"""Files are data, never code (``dassl/utils/safe_load.py``): checkpoints, CLIP weights and cache entries are read
weights-only; a pickle payload executes nothing and is one ``error:`` line (exit 2) naming the file and
``tools/data_only.py``, which keeps a file's data with every other object left inert. TorchScript archives go
through ``torch.jit.load``.

The payload is an object whose unpickling calls ``open(marker, "w")``: the marker file exists iff code ran.
"""
from __future__ import annotations

import datetime
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import TINY
from procs import run_train_forked
from synthetic import write_lodo_tree

PACS_CFG = "configs/datasets/PACS.yaml"


class Payload:
    """Unpickling this object creates ``marker`` (what an attacker's shell command would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module", autouse=True)
def _warm():
    import train  # noqa: F401  (imported once; forked children inherit it)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("data"))
    write_lodo_tree(r, per_class=2)
    return r


def args(root: str, out: str, trainer: str, flags=(), extra=()) -> list[str]:
    return ["--root", root, "--seed", "1", "--trainer", trainer, "--dataset-config-file", PACS_CFG,
            "--config-file", f"configs/trainers/{trainer}/rn50_ep30.yaml", "--output-dir", out, *flags, *TINY,
            "VERBOSE", "False", "TEST_ENV", "sketch", "OPTIM.MAX_EPOCH", "1", *extra]


def refused(res, out: str, needle: str) -> str:
    """Exit 2, exactly one stderr line (no traceback) containing ``needle``, no record / done."""
    lines = res.error_lines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert needle in lines[0], lines[0]
    assert not os.path.exists(os.path.join(out, "done")) and not os.path.exists(os.path.join(out, "record.json"))
    return lines[0]


def _payload_file(path: str, marker: str, wrap: bool = True) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    obj = {"state_dict": {"w": torch.zeros(1)}, "epoch": 1, "x": Payload(marker)} if wrap else Payload(marker)
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------ through train.py
def test_checkpoint_payload_in_model_dir_executes_nothing(root, tmp_path):
    marker = str(tmp_path / "pwned")
    model_dir = str(tmp_path / "shared_model")
    path = _payload_file(os.path.join(model_dir, "clip_adapter", "model-best.pth.tar"), marker)
    out = str(tmp_path / "eval")
    res = run_train_forked(args(root, out, "CLIP_Adapter", flags=["--eval-only", "--model-dir", model_dir]),
                           str(tmp_path))
    line = refused(res, out, f"refusing to unpickle checkpoint {path}")
    assert "tools/data_only.py" in line and "nothing in it ran" in line
    assert not os.path.exists(marker)


@pytest.mark.parametrize("fmt", ["torch_save", "plain_pickle"])
def test_weights_payload_executes_nothing(root, tmp_path, fmt):
    marker = str(tmp_path / "pwned")
    weights = str(tmp_path / "RN50.pt")
    if fmt == "torch_save":
        _payload_file(weights, marker, wrap=False)
    else:  # the legacy (non-zip) format torch.load also reads
        with open(weights, "wb") as f:
            pickle.dump({"visual.proj": Payload(marker)}, f, protocol=2)
    out = str(tmp_path / "run")
    res = run_train_forked(args(root, out, "CLIP_Adapter", extra=["MODEL.BACKBONE.WEIGHTS", weights]),
                           str(tmp_path))
    refused(res, out, f"refusing to unpickle CLIP weights {weights}")
    assert not os.path.exists(marker) and not os.path.exists(out)


def test_resume_refuses_a_payload_checkpoint(root, tmp_path):
    """A code-carrying newest checkpoint in the run's own directory is refused in one line naming it (exit 2):
    nothing in the file runs, nothing is marked done, and the run does not silently fall back to an older one."""
    marker = str(tmp_path / "pwned")
    out = str(tmp_path / "run")
    two = ["OPTIM.MAX_EPOCH", "2", "TRAIN.CHECKPOINT_FREQ", "1"]
    res = run_train_forked(args(root, out, "CLIP_Adapter", extra=two), str(tmp_path))
    assert res.returncode == 0, res.stderr
    for f in ("record.json", "done"):
        os.unlink(os.path.join(out, f))
    last = _payload_file(os.path.join(out, "clip_adapter", "model.pth.tar-2"), marker)
    res = run_train_forked(args(root, out, "CLIP_Adapter", extra=two), str(tmp_path))
    assert res.returncode == 2
    assert f"refusing to unpickle checkpoint {last}" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not os.path.exists(marker) and not os.path.exists(os.path.join(out, "done"))


def test_tip_adapter_cache_payload_executes_nothing(root, tmp_path):
    """The official cache file ``<CACHE_DIR>/keys_<K>shotsseed<S>.pt`` (reused whenever it exists) is data."""
    marker = str(tmp_path / "pwned")
    cache_dir = str(tmp_path / "cache")
    path = _payload_file(os.path.join(cache_dir, "keys_-1shotsseed1.pt"), marker)
    out = str(tmp_path / "run")
    res = run_train_forked(args(root, out, "TIP_ADAPTER", extra=["TRAINER.TIP_ADAPTER.CACHE_DIR", cache_dir]),
                           str(tmp_path))
    refused(res, out, f"refusing to unpickle Tip-Adapter cache {path}")
    assert not os.path.exists(marker)


def test_feature_store_shard_payload_executes_nothing(tmp_path):
    """A feature-cache shard is read with ``np.load(allow_pickle=False)``: a pickle is one DataError line."""
    import json

    from dassl.engine.feature_store import FeatureStore
    from dassl.utils.errors import DataError

    marker = str(tmp_path / "pwned")
    folder = tmp_path / "store"
    folder.mkdir()
    with open(folder / "w1.npy", "wb") as f:
        pickle.dump(Payload(marker), f)
    (folder / "w1.json").write_text(json.dumps({"paths": ["/img/a.png"], "dim": 4}))
    with pytest.raises(DataError, match=r"feature cache shard .*w1\.npy is not a feature array"):
        FeatureStore(str(folder)).get("/img/a.png")
    assert not os.path.exists(marker)


# ------------------------------------------------------------------ tools/data_only.py
def _data_only(*argv: str) -> subprocess.CompletedProcess:
    from helpers import COOP

    return subprocess.run([sys.executable, "tools/data_only.py", *argv], cwd=COOP, capture_output=True, text=True,
                          timeout=300)


def test_data_only_keeps_the_data_and_builds_nothing(tmp_path):
    """An upstream-Dassl-like checkpoint (its scheduler state holds a scheduler object), a date and a payload:
    ``tools/data_only.py`` writes the data (loadable weights-only), drops the rest by name, runs nothing."""
    from dassl.utils.safe_load import UnsafeFileError, load_torch_file

    marker = str(tmp_path / "pwned")
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(2)
    opt.step()
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    src, dst = str(tmp_path / "upstream.pth.tar"), str(tmp_path / "data.pth.tar")
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 7, "optimizer": opt.state_dict(),
                "scheduler": {"last_epoch": 7, "successor": successor}, "saved": datetime.date(2024, 7, 1),
                "x": Payload(marker)}, src)
    with pytest.raises(UnsafeFileError, match="refusing to unpickle checkpoint .*tools/data_only.py"):
        load_torch_file(src, "checkpoint")
    res = _data_only(src, dst)
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(marker)
    for name in ("CosineAnnealingLR", "datetime.date", "io.open"):
        assert name in res.stdout, res.stdout
    got = load_torch_file(dst, "checkpoint")
    assert torch.equal(got["state_dict"]["w"], torch.arange(3.0)) and got["epoch"] == 7
    assert got["scheduler"] == {"last_epoch": 7} and "saved" not in got and "x" not in got
    assert torch.equal(got["optimizer"]["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])


def test_data_only_refuses_a_file_without_data(tmp_path):
    """A whole pickled object (a payload, a pickled module) holds no data: exit 2, one line, nothing written."""
    marker = str(tmp_path / "pwned")
    src = _payload_file(str(tmp_path / "p.pt"), marker, wrap=False)
    res = _data_only(src, str(tmp_path / "out.pt"))
    assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "holds no data" in res.stderr and not os.path.exists(tmp_path / "out.pt") and not os.path.exists(marker)
    res = _data_only(str(tmp_path / "missing.pt"), str(tmp_path / "out.pt"))
    assert res.returncode == 2 and "cannot read" in res.stderr and "missing.pt" in res.stderr


def test_a_converted_upstream_checkpoint_evaluates(root, tmp_path):
    """``train.py --eval-only --model-dir``: a checkpoint with an object inside is refused (one line naming the
    tool); its ``tools/data_only.py`` copy evaluates."""
    model_dir = str(tmp_path / "model")
    src = str(tmp_path / "trained")
    res = run_train_forked(args(root, src, "CLIP_Adapter"), str(tmp_path))
    assert res.returncode == 0, res.stderr
    ckpt = torch.load(os.path.join(src, "clip_adapter", "model-best.pth.tar"), weights_only=True)
    ckpt["saved"] = datetime.date(2024, 7, 1)
    best = os.path.join(model_dir, "clip_adapter", "model-best.pth.tar")
    os.makedirs(os.path.dirname(best))
    torch.save(ckpt, best)
    eval_args = args(root, str(tmp_path / "e1"), "CLIP_Adapter", flags=["--eval-only", "--model-dir", model_dir])
    line = refused(run_train_forked(eval_args, str(tmp_path)), str(tmp_path / "e1"),
                   "unsupported GLOBAL datetime.date")
    assert "tools/data_only.py" in line
    assert _data_only(best, best).returncode == 0
    eval_args = args(root, str(tmp_path / "e2"), "CLIP_Adapter", flags=["--eval-only", "--model-dir", model_dir])
    res = run_train_forked(eval_args, str(tmp_path))
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------ what the project writes loads weights-only
def test_old_checkpoints_with_numpy_rng_state_load(tmp_path):
    """Checkpoints written before RNG states became tensors hold numpy's state tuple (an ndarray): allowed."""
    from dassl.utils.torchtools import load_checkpoint

    np.random.seed(5)
    state = np.random.get_state()
    path = str(tmp_path / "model.pth.tar-1")
    torch.save({"state_dict": {}, "epoch": 1, "rng_state": {"numpy": state}}, path)
    got = load_checkpoint(path)["rng_state"]["numpy"]
    assert got[0] == state[0] and np.array_equal(got[1], state[1]) and got[1].dtype == state[1].dtype
    assert tuple(got[2:]) == tuple(state[2:])


def test_torchscript_archives_only_through_jit(tmp_path):
    from clip_backbone.loader import _read_state_dict
    from dassl.utils.safe_load import UnsafeFileError, is_torchscript_archive, load_torch_file

    lin = torch.nn.Linear(3, 2)
    ts, plain = str(tmp_path / "ts.pt"), str(tmp_path / "plain.pt")
    torch.jit.save(torch.jit.script(lin), ts)
    torch.save(lin.state_dict(), plain)
    assert is_torchscript_archive(ts) and not is_torchscript_archive(plain)
    assert torch.equal(_read_state_dict(ts)["weight"], lin.weight.detach())  # weights: jit.load
    with pytest.raises(UnsafeFileError, match="is a TorchScript archive"):  # a checkpoint never is one
        load_torch_file(ts, "checkpoint")
