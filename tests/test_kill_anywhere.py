"""kill -9 at progress markers (start-up, checkpoints, a cache lane's fill), then the same command again: results
equal an uninterrupted run, nothing lost or doubled.

(a) training (5 kills, CRoFT), (b) a sweep of several runs through the real Setup-II driver, (c) a feature-cache
fill, (d) an open-set evaluation. The killed process is the forked child doing the work (:mod:`procs`), never a
wrapper shell. All marked ``slow``; the fast representative is in ``test_faults.py``.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from helpers import TINY
from procs import kill_when, start_forked, train_starter, wait_forked
from synthetic import write_lodo_tree
from synthetic_openset import write_all_openset

pytestmark = pytest.mark.slow

CRoFT_CFG = "configs/trainers/CRoFT/rn50_ep30.yaml"
FAST = ["OPTIM.MAX_EPOCH", "3", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "DATALOADER.TEST.BATCH_SIZE", "16"]
# default keys: no TRAIN.CHECKPOINT_FREQ; every run keeps best + the rolling last checkpoint


@pytest.fixture(scope="module", autouse=True)
def _warm():
    import train  # noqa: F401
    from launch import setup2  # noqa: F401


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("data"))
    write_lodo_tree(r, per_class=6)
    write_all_openset(r)
    return r


def argv(root: str, out: str, dataset: str = "PACS", flags=(), extra=()) -> list[str]:
    return ["--root", root, "--seed", "1", "--trainer", "CRoFT", "--dataset-config-file",
            f"configs/datasets/{dataset}.yaml", "--config-file", CRoFT_CFG, "--output-dir", out, *flags, *TINY,
            "VERBOSE", "False", "TEST_ENV", "sketch", *FAST, *extra]


def record(d: str) -> dict:
    with open(os.path.join(d, "record.json"), encoding="utf-8") as f:
        return json.load(f)


def same_result(a: str, b: str, checkpoints: bool = True) -> None:
    ra, rb = record(a), record(b)
    for key in ("best_epoch", "val_history", "metrics", "fingerprint"):
        assert ra.get(key) == rb.get(key), key
    assert os.path.isfile(os.path.join(b, "done"))
    assert [f for f in os.listdir(b) if f.startswith("log.txt")] == ["log.txt"]  # one log, appended
    if not checkpoints:
        return
    for model in ("clip_adapter", "generator"):
        names = sorted(f for f in os.listdir(os.path.join(a, model)) if f.startswith("model"))
        assert names == sorted(f for f in os.listdir(os.path.join(b, model)) if f.startswith("model"))
        for f in names:
            sa = torch.load(os.path.join(a, model, f), weights_only=False)["state_dict"]
            sb = torch.load(os.path.join(b, model, f), weights_only=False)["state_dict"]
            # bitwise: forked runs with the same thread count and batches on one machine
            assert all(torch.equal(sa[k], sb[k]) for k in sa), (model, f)


def kill_at_markers(start, marks) -> tuple[int, object]:
    """Start, SIGKILL ``delay`` s after each ``(path, delay)`` marker appears (one start per marker; ``path`` may be
    a glob pattern), then run to the end: (kills that hit a live process, the final run's result)."""
    hits = 0
    for path, delay in marks:
        pid, o, e = start()
        hits += kill_when(pid, lambda m=path: bool(glob.glob(m)), delay)
        wait_forked(pid, o, e)
    return hits, wait_forked(*start())


def uninterrupted(args: list[str], workdir: str) -> None:
    res = wait_forked(*train_starter(args, workdir)())
    assert res.returncode == 0, res.stderr


def test_a_training_five_kills(root, tmp_path):
    """Killed at progress markers (during start-up, right after and between the two models' checkpoints), not at
    wall-clock guesses: a faster run must not finish before the kills."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    uninterrupted(argv(root, ref), str(tmp_path))
    marks = [("log.txt", 0.05), ("clip_adapter/model.pth.tar-1", 0.0), ("generator/model.pth.tar-1", 0.02),
             ("clip_adapter/model.pth.tar-2", 0.0), ("generator/model.pth.tar-3", 0.0)]
    hits, res = kill_at_markers(train_starter(argv(root, out), str(tmp_path)),
                                [(os.path.join(out, rel), delay) for rel, delay in marks])
    assert res.returncode == 0, res.stderr
    assert hits >= 3
    same_result(ref, out)


def _sweep_dirs(base: str) -> list[str]:
    return sorted(dp for dp, _, files in os.walk(base) if "done" in files)


def _sweep_starter(root: str, tmp_path, out: str, domains, lambda2, epochs: int, batch: int, flags=()):
    """A ``start`` forking the Setup-II driver on a small CRoFT sweep (default keys: rolling checkpoints)."""
    from launch import setup2

    common = ["--root", root, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1", "--domains", *domains,
              "--lambda2", *lambda2, "--epochs", str(epochs), "--shots", "2", "--output-root", out, "--launcher",
              "inprocess", *flags, "--", *TINY, "DATALOADER.TRAIN_X.BATCH_SIZE", str(batch)]
    return lambda: start_forked(lambda: setup2.main(common, trainer="CRoFT"), str(tmp_path))


def _same_sweeps(ref: str, out: str) -> list[str]:
    runs = [os.path.relpath(d, ref) for d in _sweep_dirs(ref)]
    assert runs == [os.path.relpath(d, out) for d in _sweep_dirs(out)]
    for rel in runs:
        same_result(os.path.join(ref, rel), os.path.join(out, rel))
    return runs


def test_b_sweep_of_several_runs(root, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    sweep = lambda o: _sweep_starter(root, tmp_path, o, ["sketch", "photo"], ["1", "10"], epochs=2, batch=8)  # noqa: E731
    assert wait_forked(*sweep(ref)()).returncode == 0
    runs = [os.path.join(out, os.path.relpath(d, ref)) for d in _sweep_dirs(ref)]
    # inside the first run, right after a second run's checkpoint, at a third's start, inside the last one
    marks = [(os.path.join(runs[0], "clip_adapter", "model.pth.tar-1"), 0.0),
             (os.path.join(runs[1], "generator", "model.pth.tar-1"), 0.0),
             (os.path.join(runs[2], "log.txt"), 0.05), (os.path.join(runs[3], "clip_adapter", "model.pth.tar-2"), 0.0)]
    hits, res = kill_at_markers(sweep(out), marks)
    assert res.returncode == 0, res.stderr
    assert hits >= 2
    assert len(_same_sweeps(ref, out)) == 4
    manifests = [os.path.join(dp, f) for dp, _, fs in os.walk(out) for f in fs if dp.endswith("sweeps")]
    for path in manifests:
        with open(path) as f:
            dirs = [j["output_dir"] for j in json.load(f)["jobs"]]
        assert len(dirs) == len(set(dirs))  # nothing listed twice


def test_e_stacked_sweep(root, tmp_path):
    """``--stack``: a stacked λ-sweep killed between (and right after) its members' checkpoints resumes to the
    uninterrupted stacked sweep, bit for bit (members saved one epoch further are rewound to the common one)."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    sweep = lambda o: _sweep_starter(root, tmp_path, o, ["sketch"], ["1", "10", "100"], epochs=6, batch=4,  # noqa: E731
                                     flags=["--stack"])
    assert wait_forked(*sweep(ref)()).returncode == 0
    members = [os.path.join(out, os.path.relpath(d, ref)) for d in _sweep_dirs(ref)]
    assert len(members) == 3
    # (member, epoch, delay): right after member 0's checkpoint (before the others'), then later points
    hits, res = kill_at_markers(sweep(out), [(os.path.join(members[k], "clip_adapter", f"model.pth.tar-{epoch}"), d)
                                             for k, epoch, d in ((0, 2, 0.0), (1, 3, 0.0), (2, 4, 0.05), (0, 6, 0.0))])
    assert res.returncode == 0, res.stderr
    assert hits >= 3
    assert len(_same_sweeps(ref, out)) == 3


def test_c_feature_cache_fill(root, tmp_path):
    cache = ["FEATURE_CACHE.ENABLED", "True", "FEATURE_CACHE.TRAIN_VIEWS", "3"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    uninterrupted(argv(root, ref, extra=cache + ["FEATURE_CACHE.DIR", str(tmp_path / "cache_ref")]), str(tmp_path))
    start = train_starter(argv(root, out, extra=cache + ["FEATURE_CACHE.DIR", str(tmp_path / "cache_k")]),
                          str(tmp_path))
    fill = str(tmp_path / "cache_k" / "*" / "{}" / ".fill.lock*")  # a lane's lock: its fill has begun
    hits, res = kill_at_markers(start, [(fill.format("train_v0"), 0.0), (fill.format("train_v1"), 0.05),
                                        (fill.format("test"), 0.0)])
    assert res.returncode == 0, res.stderr
    assert hits >= 1
    same_result(ref, out)

    ref_store, killed_store = stored(str(tmp_path / "cache_ref")), stored(str(tmp_path / "cache_k"))
    assert ref_store.keys() == killed_store.keys() and ref_store
    for key, feats in ref_store.items():
        assert sorted(feats) == sorted(killed_store[key]), key
        # bitwise: far fewer images than FLUSH_ROWS, so a killed lane stored nothing and is encoded again whole,
        # in the batches of the uninterrupted fill (same data root, hence same lanes)
        assert all(np.array_equal(feats[p], killed_store[key][p]) for p in feats), key


def stored(cache_dir: str) -> dict:
    """{store folder: {image path: feature}} from the committed shards; a path stored twice fails."""
    out: dict = {}
    for dp, _, fs in os.walk(cache_dir):
        for f in sorted(fs):
            if not f.endswith(".json") or f.startswith(".") or not os.path.isfile(os.path.join(dp, f[:-5] + ".npy")):
                continue
            with open(os.path.join(dp, f)) as fh:
                index = json.load(fh)
            if not isinstance(index, dict) or "paths" not in index:
                continue
            paths = index["paths"]
            feats = np.load(os.path.join(dp, f[:-5] + ".npy"))
            store = out.setdefault(os.path.relpath(dp, cache_dir), {})
            for p, x in zip(paths, feats):
                assert p not in store, f"{p} stored twice in {dp}"
                store[p] = x
    return out


def test_d_open_set_evaluation(root, tmp_path):
    model = str(tmp_path / "model")
    uninterrupted(argv(root, model), str(tmp_path))
    ev = ["--eval-only", "--model-dir", model]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    uninterrupted(argv(root, ref, "PACS_DTD", ev), str(tmp_path))
    log = os.path.join(out, "log.txt")  # killed at progress markers, not wall-clock guesses (runs get faster)
    hits, res = kill_at_markers(train_starter(argv(root, out, "PACS_DTD", ev), str(tmp_path)),
                                [(log, 0.05), (log, 0.4), (log, 0.8)])
    assert res.returncode == 0, res.stderr
    assert hits >= 1
    same_result(ref, out, checkpoints=False)
    assert "ood" in record(out)["metrics"]
