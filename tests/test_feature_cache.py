"""Feature cache: one encoding per image and augmented view, shared across runs, same results on reuse."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import cli_args, run_cli
from synthetic import write_lodo_tree
from synthetic_openset import write_all_openset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("fc_data")
    write_lodo_tree(str(r), per_class=6)
    write_all_openset(str(r))
    return str(r)


def _args(root, out, cache, trainer="CRoFT", extra=(), **kw):
    return cli_args(root, out, trainer, extra=["FEATURE_CACHE.ENABLED", "True", "FEATURE_CACHE.DIR", cache,
                                               "FEATURE_CACHE.TRAIN_VIEWS", "3", "OPTIM.MAX_EPOCH", "2",
                                               "DATALOADER.TRAIN_X.BATCH_SIZE", "8", *extra], **kw)


def _stores(cache_key_dir):
    return sorted(f for f in os.listdir(cache_key_dir) if os.path.isdir(os.path.join(cache_key_dir, f)))


def _stamps(folder):
    """Every file under ``folder`` with its size and mtime: equal before and after = nothing written."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return out


def _load(cache_key_dir, kind):
    from dassl.engine.feature_store import FeatureStore

    paths, feats = FeatureStore(os.path.join(cache_key_dir, kind)).to_arrays()
    return {"paths": paths, "feats": torch.from_numpy(feats)}


def test_cache_is_built_once_and_reused(root, tmp_path):
    cache = str(tmp_path / "fc")
    r1 = run_cli(_args(root, str(tmp_path / "a"), cache))
    (key,) = os.listdir(cache)
    assert _stores(os.path.join(cache, key)) == ["test", "train_v0", "train_v1", "train_v2"]
    stamps = _stamps(os.path.join(cache, key))
    r2 = run_cli(_args(root, str(tmp_path / "b"), cache))
    assert stamps == _stamps(os.path.join(cache, key))  # nothing re-encoded
    assert r2["feature_cache"] == r1["feature_cache"] and r2["feature_cache"]["hits"] > 0  # served from the cache
    assert r2["feature_cache"]["fallbacks"] == 0
    # bitwise: both runs train on the same stored features (the first run reads what it stored), in one process
    # with the same batches, so the same kernels see the same inputs
    assert r1["metrics"]["test"] == r2["metrics"]["test"]
    a = torch.load(tmp_path / "a" / "clip_adapter" / "model.pth.tar-2", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b" / "clip_adapter" / "model.pth.tar-2", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    v0, v1 = _load(os.path.join(cache, key), "train_v0"), _load(os.path.join(cache, key), "train_v1")
    assert v0["paths"] == v1["paths"] and v0["feats"].shape[1] == 32
    assert not torch.equal(v0["feats"], v1["feats"])  # views really differ


def test_cached_test_features_equal_direct_encoding(root, tmp_path):
    """Evaluation with cached features gives the same outputs as encoding images on the fly."""
    out_direct, out_cached = tmp_path / "d", tmp_path / "c"
    ev = ["--eval-only"]
    direct = run_cli(cli_args(root, str(out_direct), "ZeroshotCLIP", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                              flags=ev, extra=["DATALOADER.OOD_TEST.TRANSFORM", "test"]))
    cached = run_cli(_args(root, str(out_cached), str(tmp_path / "fc"), "ZeroshotCLIP", flags=ev,
                           dataset_cfg="configs/datasets/PACS_DTD.yaml", extra=["DATALOADER.OOD_TEST.TRANSFORM", "test"]))
    assert "feature_cache" not in direct
    # every evaluation batch (test for accuracy, then test, ood_test and val for detection) came from the cache
    assert cached["feature_cache"]["fallbacks"] == 0 and cached["feature_cache"]["hits"] >= 4
    zd, zc = np.load(out_direct / "scores.npz"), np.load(out_cached / "scores.npz")
    for key in ("test__logits", "val__features", "ood_test__score_energy"):
        np.testing.assert_allclose(zd[key], zc[key], rtol=1e-5, atol=1e-5)


def test_cache_key_changes_with_weights_and_input(root, tmp_path):
    from dassl.config import get_cfg_default
    from dassl.engine.feature_cache import cache_key

    cfg = get_cfg_default()
    k1 = cache_key(cfg, torch.float32)
    cfg.INPUT.SIZE = (64, 64)
    k2 = cache_key(cfg, torch.float32)
    cfg.MODEL.BACKBONE.NAME = "RN50"
    k3 = cache_key(cfg, torch.float32)
    assert len({k1, k2, k3, cache_key(cfg, torch.float16)}) == 4


def _extract_cmd(root, cache, dataset_cfg):
    return ["--root", root, "--seed", "1", "--trainer", "ZeroshotCLIP", "--dataset-config-file", dataset_cfg,
            "--config-file", "configs/trainers/ZeroshotCLIP/rn50_ep30.yaml", "MODEL.BACKBONE.NAME", "tiny-rn-test",
            "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0",
            "DEVICE", "cpu", "TEST_ENV", "sketch", "DATASET.NUM_SHOTS", "2", "FEATURE_CACHE.TRAIN_VIEWS", "2",
            "FEATURE_CACHE.DIR", cache]


def test_torchrun_extraction_equals_single_process(root, tmp_path):
    """2 ranks under torchrun fill the same stores as 1 process; runs then find everything cached."""
    import subprocess
    import sys

    from helpers import COOP

    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "tools/extract_features.py",
                          *_extract_cmd(root, single, "configs/datasets/PACS_DTD.yaml")],
                         cwd=COOP, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "tools/extract_features.py",
                          *_extract_cmd(root, multi, "configs/datasets/PACS_DTD.yaml")],
                         cwd=COOP, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rank 0 of 2" in res.stdout
    (key,) = os.listdir(single)
    assert os.listdir(multi) == [key]
    names = _stores(os.path.join(single, key))
    assert names == ["test", "train_v0", "train_v1"]
    for name in names:
        a, b = _load(os.path.join(single, key), name), _load(os.path.join(multi, key), name)
        # each rank appended its own shards (named after the rank), nothing was merged into one file
        ranks = {f.split("-")[0] for f in os.listdir(os.path.join(multi, key, name)) if f.endswith(".npy")}
        assert ranks == {"r0", "r1"}, name
        assert a["paths"] == b["paths"], name
        # same images and views; only the batch composition differs (float rounding of batched convolutions)
        torch.testing.assert_close(a["feats"], b["feats"], rtol=1e-4, atol=1e-5)
    stamps = _stamps(os.path.join(multi, key))
    run_cli(cli_args(root, str(tmp_path / "ev"), "ZeroshotCLIP", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                     flags=["--eval-only"], extra=["FEATURE_CACHE.ENABLED", "True", "FEATURE_CACHE.DIR", multi,
                                                   "FEATURE_CACHE.TRAIN_VIEWS", "2", "DATASET.NUM_SHOTS", "2"]))
    assert stamps == _stamps(os.path.join(multi, key))


def test_views_do_not_depend_on_where_the_data_lies(root, tmp_path):
    """The same data tree copied elsewhere gives the same augmented training views (seeds use paths relative to
    DATASET.ROOT), and another view index gives another seed."""
    import shutil

    from dassl.engine.feature_cache import view_seed

    moved = str(tmp_path / "elsewhere" / "data")
    shutil.copytree(root, moved)
    feats, other_view = [], None
    for r, tag in ((root, "a"), (moved, "b")):
        cache = str(tmp_path / f"fc_{tag}")
        run_cli(_args(r, str(tmp_path / tag), cache, extra=["OPTIM.MAX_EPOCH", "1"]))
        (key,) = os.listdir(cache)
        feats.append(_load(os.path.join(cache, key), "train_v1")["feats"])
        other_view = _load(os.path.join(cache, key), "train_v0")["feats"]
    # Bitwise: fill lanes and batches come from paths relative to DATASET.ROOT, so both trees are encoded in the
    # same batches, in this process, with the same threads (an Intel AVX-512 machine once differed in the last
    # bits when lanes were keyed by absolute paths and the trees were batched differently).
    assert torch.equal(feats[0], feats[1])
    assert (other_view - feats[1]).abs().max() > 1e-4
    img = os.path.join(root, "PACS", "x.png")
    assert view_seed(1, img, root) == view_seed(1, os.path.join(moved, "PACS", "x.png"), moved)
    assert view_seed(1, img, root) != view_seed(2, img, root)


def test_a_view_is_the_transform_drawn_from_its_seed(root):
    """Augmented view ``v`` of an image is the training transform drawn right after ``torch.manual_seed(view_seed)``
    (by hand here), and drawing it leaves the caller's random stream where it was."""
    import glob

    from PIL import Image
    from torchvision import transforms as T

    from dassl.engine.feature_cache import _SeededViews, view_seed

    paths = sorted(glob.glob(os.path.join(root, "**", "*.png"), recursive=True))[:3]
    assert len(paths) == 3
    tfm = T.Compose([T.RandomResizedCrop(16, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    views = _SeededViews(paths, tfm, view=2, root=root)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    got = [views[i][0] for i in range(3)]
    assert torch.equal(torch.get_rng_state(), before)
    for path, img in zip(paths, got):
        torch.manual_seed(view_seed(2, path, root))
        assert torch.equal(img, tfm(Image.open(path).convert("RGB")))
    assert not torch.equal(got[0], _SeededViews(paths, tfm, view=3, root=root)[0][0])


def test_a_cached_feature_does_not_depend_on_its_batch():
    """The cache encodes every batch padded to ``ENCODE_BATCH`` rows (``pad_batch``), so an image's feature is the
    same bits whichever images share its batch, at whichever position (which run or fill lane encoded it first);
    an unpadded short batch gives other bits on this encoder, which is why the padding exists."""
    from clip_backbone.loader import load_clip
    from dassl.engine.feature_cache import ENCODE_BATCH, pad_batch

    torch.manual_seed(0)
    enc = load_clip("tinyclip-rn32", "random").model.visual.eval()
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        alone = enc(pad_batch(x[:5], ENCODE_BATCH))[:5]
        mixed = enc(pad_batch(torch.cat([x[7:10], x[:5]]), ENCODE_BATCH))[3:8]
        reversed_ = enc(pad_batch(x[[4, 3, 2, 1, 0]], ENCODE_BATCH))[[4, 3, 2, 1, 0]]
    assert torch.equal(alone, mixed) and torch.equal(alone, reversed_)
    assert torch.equal(pad_batch(x, 12), x) and len(pad_batch(x[:5], 16)) == 16
    assert torch.equal(pad_batch(x[:3], 5)[3:], x[2:3].expand(2, 3, 32, 32))
