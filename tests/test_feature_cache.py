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


def test_cache_is_built_once_and_reused(root, tmp_path):
    cache = str(tmp_path / "fc")
    r1 = run_cli(_args(root, str(tmp_path / "a"), cache))
    (key,) = os.listdir(cache)
    files = sorted(os.listdir(os.path.join(cache, key)))
    assert [f for f in files if f.endswith(".pt")] == ["test.pt", "train_v0.pt", "train_v1.pt", "train_v2.pt"]
    files = [f for f in files if f.endswith(".pt")]
    stamps = {f: os.path.getmtime(os.path.join(cache, key, f)) for f in files}
    r2 = run_cli(_args(root, str(tmp_path / "b"), cache))
    assert stamps == {f: os.path.getmtime(os.path.join(cache, key, f)) for f in files}  # nothing re-encoded
    assert r1["metrics"]["test"] == r2["metrics"]["test"]
    a = torch.load(tmp_path / "a" / "clip_adapter" / "model.pth.tar-2", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b" / "clip_adapter" / "model.pth.tar-2", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    v0 = torch.load(os.path.join(cache, key, "train_v0.pt"), weights_only=True)
    v1 = torch.load(os.path.join(cache, key, "train_v1.pt"), weights_only=True)
    assert v0["paths"] == v1["paths"] and v0["feats"].shape[1] == 32
    assert not torch.equal(v0["feats"], v1["feats"])  # views really differ


def test_cached_test_features_equal_direct_encoding(root, tmp_path):
    """Evaluation with cached features gives the same outputs as encoding images on the fly."""
    out_direct, out_cached = tmp_path / "d", tmp_path / "c"
    ev = ["--eval-only"]
    run_cli(cli_args(root, str(out_direct), "ZeroshotCLIP", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                     flags=ev, extra=["DATALOADER.OOD_TEST.TRANSFORM", "test"]))
    run_cli(_args(root, str(out_cached), str(tmp_path / "fc"), "ZeroshotCLIP", flags=ev,
                  dataset_cfg="configs/datasets/PACS_DTD.yaml", extra=["DATALOADER.OOD_TEST.TRANSFORM", "test"]))
    zd, zc = np.load(out_direct / "scores.npz"), np.load(out_cached / "scores.npz")
    for key in ("test__logits", "val__features", "ood_test__energy"):
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
