"""Sharded feature store: append-only shards, constant insertion cost, concurrent and killed writers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import COOP

DIM = 16


def feats_of(paths):
    """Deterministic features of fake paths ``img-<n>``: row n is n + [0, 1, ..., D-1] / D."""
    n = np.array([int(p.split("-")[1]) for p in paths], dtype=np.float32)[:, None]
    return n + np.arange(DIM, dtype=np.float32)[None] / DIM


def names(lo, hi):
    return [f"img-{i}" for i in range(lo, hi)]


def _files(folder):
    return {f: (os.stat(os.path.join(folder, f)).st_size, os.stat(os.path.join(folder, f)).st_mtime_ns)
            for f in os.listdir(folder)}


def test_round_trip_dedup_and_reopen(tmp_path):
    from dassl.engine.feature_store import FeatureStore

    st = FeatureStore(str(tmp_path / "s"))
    assert st.add(names(0, 10), torch.from_numpy(feats_of(names(0, 10)))) == 10
    assert st.add(names(5, 15), feats_of(names(5, 15))) == 5  # 5..9 already stored
    again = FeatureStore(str(tmp_path / "s"))
    assert len(again) == 15 and again.num_shards == 2 and "img-14" in again and "img-15" not in again
    np.testing.assert_array_equal(again.get("img-7").numpy(), feats_of(["img-7"])[0])
    paths, feats = again.to_arrays()
    assert paths == sorted(names(0, 15))
    np.testing.assert_array_equal(feats, feats_of(paths))
    with pytest.raises(ValueError, match="one feature row per path"):
        again.add(["a", "b"], np.zeros((3, DIM)))


def test_insertion_cost_does_not_grow_with_the_store(tmp_path):
    """200k features in chunks of 1000: the last chunk writes as many bytes, and takes about as long, as the
    first (a store that rewrote itself would write 200x the bytes for the last chunk)."""
    from dassl.engine.feature_store import FeatureStore

    folder = str(tmp_path / "big")
    st = FeatureStore(folder)
    chunk, total = 1000, 200_000
    written, seconds = [], []
    rng = np.random.default_rng(0)
    for lo in range(0, total, chunk):
        before = _files(folder) if os.path.isdir(folder) else {}
        x = rng.standard_normal((chunk, DIM), dtype=np.float32)
        t0 = time.perf_counter()
        st.add(names(lo, lo + chunk), x)
        seconds.append(time.perf_counter() - t0)
        after = _files(folder)
        written.append(sum(size for f, (size, mt) in after.items() if before.get(f) != (size, mt)))
    assert len(FeatureStore(folder)) == total
    assert written[-1] <= 1.05 * written[0]  # only the new shard (+ the lock file's first creation)
    assert written[-1] < 2 * chunk * DIM * 4 + 20_000
    assert min(seconds[-10:]) < 5 * min(seconds[:10]) + 0.005, (seconds[:10], seconds[-10:])
    np.testing.assert_array_equal(st.get("img-199999").numpy(), x[-1])


WRITER = """
import importlib.util, sys, numpy as np
spec = importlib.util.spec_from_file_location("feature_store", {path!r})  # the module alone: no torch import
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
FeatureStore = mod.FeatureStore
DIM = {dim}
folder, lo, hi, step, loop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
st = FeatureStore(folder)
while True:
    for a in range(lo, hi, step):
        p = [f"img-{{i}}" for i in range(a, min(a + step, hi))]
        n = np.array([int(q.split("-")[1]) for q in p], dtype=np.float32)[:, None]
        st.add(p, np.repeat(n + np.arange(DIM, dtype=np.float32)[None] / DIM, {rep}, axis=1)[:, :DIM])
    if not loop:
        break
    lo, hi = hi, hi + (hi - lo)
"""


def _writer(folder, lo, hi, step, loop=False, rep=1):
    code = WRITER.format(path=os.path.join(COOP, "dassl", "engine", "feature_store.py"), dim=DIM, rep=rep)
    return subprocess.Popen([sys.executable, "-c", code, folder, str(lo), str(hi), str(step), "1" if loop else "0"])


def _check_consistent(folder):
    import json

    from dassl.engine.feature_store import FeatureStore

    st = FeatureStore(folder)
    paths, feats = st.to_arrays()
    np.testing.assert_array_equal(feats, feats_of(paths))
    indexed = []
    for f in os.listdir(folder):
        if f.endswith(".json"):
            with open(os.path.join(folder, f)) as fh:
                indexed += json.load(fh)["paths"]
    assert len(indexed) == len(set(indexed)) == len(paths)  # no path stored twice
    return paths


def test_two_concurrent_writer_processes(tmp_path):
    folder = str(tmp_path / "c")
    a, b = _writer(folder, 0, 3000, 300), _writer(folder, 1500, 4500, 250)  # overlap 1500..2999
    assert a.wait(120) == 0 and b.wait(120) == 0
    assert _check_consistent(folder) == sorted(names(0, 4500))


def test_killed_writer_leaves_no_corrupt_shard(tmp_path):
    from dassl.engine.feature_store import FeatureStore

    folder = str(tmp_path / "k")
    # big shards (10000 x 16 floats, 640 kB) so the kill very likely lands in the middle of a write
    proc = _writer(folder, 0, 10000, 10000, loop=True)
    deadline = time.time() + 60
    while time.time() < deadline and len([f for f in os.listdir(folder) if f.endswith(".json")]
                                          if os.path.isdir(folder) else []) < 2:
        time.sleep(0.05)
    time.sleep(0.037)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    paths = _check_consistent(folder)
    assert len(paths) >= 20000 and len(paths) % 10000 == 0
    st = FeatureStore(folder)
    st.add(["img-99999999"], feats_of(["img-99999999"]))  # the next writer sweeps the leftovers
    left = os.listdir(folder)
    assert not [f for f in left if f.startswith(".tmp-")]
    assert all(f[:-4] + ".json" in left for f in left if f.endswith(".npy"))


def test_old_single_file_cache_is_imported_or_rejected(tmp_path):
    from dassl.engine.feature_cache import open_store

    p = names(0, 5)
    torch.save({"paths": p, "feats": torch.from_numpy(feats_of(p))}, tmp_path / "test.pt")
    st = open_store(str(tmp_path), "test")
    assert len(st) == 5 and os.path.isdir(tmp_path / "test")
    np.testing.assert_array_equal(st.get("img-3").numpy(), feats_of(["img-3"])[0])
    (tmp_path / "train_v0.pt").write_bytes(b"not a torch file")
    from dassl.utils.errors import DataError  # train.py prints it as one line and exits non-zero

    with pytest.raises(DataError, match=r"train_v0.pt: unreadable old single-file store"):
        open_store(str(tmp_path), "train_v0")


def _tiny_cache(tmp_path, n: int = 10):
    """A FeatureCache over a linear encoder and ``n`` 4x4 images: (cache, its trainer, items)."""
    from types import SimpleNamespace

    import torch.nn as nn
    from PIL import Image

    from dassl.config import get_cfg_default
    from dassl.data.datasets import Datum
    from dassl.engine import feature_cache as fc

    items = []
    for i in range(n):
        path = str(tmp_path / f"im{i}.png")
        Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(path)
        items.append(Datum(impath=path, label=0, domain=0))
    cfg = get_cfg_default()
    cfg.DATALOADER.TEST.BATCH_SIZE = 2
    trainer = SimpleNamespace(cfg=cfg, device=torch.device("cpu"),
                              image_encoder=nn.Sequential(nn.Flatten(), nn.Linear(48, 5)), encoder_images=0)
    cache = fc.FeatureCache.__new__(fc.FeatureCache)
    cache.trainer = trainer
    return cache, trainer, items


def test_extraction_appends_a_shard_every_flush_rows(tmp_path, monkeypatch):
    """``FeatureCache._fill`` writes a shard each ``FLUSH_ROWS`` encoded images (here 4 of 10: 4 + 4 + 2)."""
    from torchvision import transforms

    from dassl.engine import feature_cache as fc

    cache, trainer, items = _tiny_cache(tmp_path)
    monkeypatch.setattr(fc, "FLUSH_ROWS", 4)
    monkeypatch.setattr(fc, "FILL_LANES", 1)  # one lane: the flushes of one encoding pass
    monkeypatch.setattr(fc, "ENCODE_BATCH", 2)  # batches of 2: a flush after the second batch
    store = fc.FeatureStore(str(tmp_path / "store"))
    cache._fill(items, transforms.ToTensor(), store, None, "t")
    sizes = sorted(len(json.load(open(os.path.join(store.folder, f)))["paths"])
                   for f in os.listdir(store.folder) if f.endswith(".json"))
    assert sizes == [2, 4, 4] and len(fc.FeatureStore(store.folder)) == 10
    assert trainer.encoder_images == 10


def test_a_second_filler_takes_free_lanes_then_waits_and_encodes_nothing_twice(tmp_path):
    """While another process holds one lane's fill lock, a fill encodes the other lanes at once, waits for the
    held lane, then reads that filler's shard for it: every image is encoded exactly once."""
    import fcntl
    import threading

    from torchvision import transforms

    from dassl.engine import feature_cache as fc

    cache, trainer, items = _tiny_cache(tmp_path)
    folder = str(tmp_path / "store")
    os.makedirs(folder)
    store = fc.FeatureStore(folder)
    paths = [d.impath for d in items]
    root = trainer.cfg.DATASET.ROOT
    held_lane = fc.fill_lane(paths[0], root)
    mine = [p for p in paths if fc.fill_lane(p, root) == held_lane]
    others = [p for p in paths if fc.fill_lane(p, root) != held_lane]
    assert mine and others  # the test needs both kinds
    lock = ".fill.lock" if held_lane == 0 else f".fill.lock.{held_lane}"
    with open(os.path.join(folder, lock), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "the first filler", busy with one lane
        waiter = threading.Thread(target=cache._fill, args=(items, transforms.ToTensor(), store, None, "t"))
        waiter.start()
        deadline = time.time() + 30
        while trainer.encoder_images < len(others) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert waiter.is_alive() and trainer.encoder_images == len(others)  # free lanes done, held lane waits
        fc.FeatureStore(folder, writer="first").add(mine, torch.zeros(len(mine), 5))
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(30)
    assert not waiter.is_alive() and trainer.encoder_images == len(others)
    assert len(fc.FeatureStore(folder)) == len(items)
