"""Setup-I datasets (ImageNet46 / ImageNetOOD46): class-split check values and the splits on a fake tree."""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest
from synthetic_imagenet import fake_classname, fake_wnid, write_imagenet_tree

from dassl.config import get_cfg_default
from dassl.utils.errors import ConfigError, DataError
from datasets.imagenet46 import (TEST_OOD_CHOICES, ImageNet46, ImageNetOOD46, add_setup1_config,
                                 imagenet46_class_split)

N_CLASSES, N_ID, N_TRAIN, N_VAL, N_VAR = 20, 8, 5, 6, 2
AR_CLASSES = list(range(0, N_CLASSES, 2))

# spec 4.1 check values (0-based line indices of classnames.txt)
CHECK = {
    1: ([507, 818, 452, 368, 242, 929, 262, 810, 318, 49, 446, 142], [0, 2, 3, 6, 8, 12, 13, 14, 16, 17, 19, 23]),
    2: ([37, 726, 846, 295, 924, 658, 682, 286, 880, 272, 137, 954], [1, 2, 4, 7, 10, 12, 13, 15, 16, 18, 20, 22]),
    3: ([642, 762, 909, 199, 586, 797, 652, 755, 416, 498, 514, 456], [3, 4, 5, 10, 14, 16, 19, 27, 28, 30, 31, 37]),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_imagenet_tree(str(tmp_path_factory.mktemp("imnet")), n_classes=N_CLASSES, n_train=N_TRAIN,
                               n_val=N_VAL, n_variant=N_VAR, ar_classes=AR_CLASSES)


def make_cfg(root: str, seed: int = 1, shots: int = 2, **kw):
    cfg = get_cfg_default()
    add_setup1_config(cfg)
    cfg.DATASET.ROOT = root
    cfg.SEED = seed
    cfg.DATASET.NUM_SHOTS = shots
    cfg.VERBOSE = False
    for k, v in kw.items():
        node, parts = cfg, k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return cfg


def build(cls, cfg):
    random.seed(cfg.SEED)  # what set_random_seed does for python's random
    return cls(cfg)


def class_index(item) -> int:
    return int(os.path.basename(os.path.dirname(item.impath))[2:])  # fake wnid n9000000k -> k


# ------------------------------------------------------------------------------------------------ class split
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_class_split_check_values(seed):
    split = imagenet46_class_split(seed)
    first, smallest = CHECK[seed]
    assert len(split) == 400 and len(set(split)) == 400
    assert split[:12] == first
    assert sorted(split)[:12] == smallest


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_class_split_matches_official_choice_and_leaves_global_rng(seed):
    np.random.seed(seed)
    official = np.random.choice(np.arange(1000), 400, replace=False).tolist()
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    assert imagenet46_class_split(seed) == official
    assert (np.random.get_state()[1] == state).all()  # global numpy RNG untouched


def test_class_split_bad_sizes():
    with pytest.raises(ValueError):
        imagenet46_class_split(1, n_classes=10, n_id=11)


# ------------------------------------------------------------------------------------------------ ImageNet46
def test_imagenet46_splits(root):
    ds = build(ImageNet46, make_cfg(root, seed=1, shots=2))
    split = imagenet46_class_split(1, N_CLASSES, N_ID)
    assert ds.class_split == split
    assert ds.num_classes == N_ID
    assert ds.classnames == [fake_classname(i) for i in split]
    assert ds.classnames_o == ds.classnames
    # train_x: K per ID class, labels = position in the split, from the train folders
    assert len(ds.train_x) == N_ID * 2
    assert sorted({it.label for it in ds.train_x}) == list(range(N_ID))
    for it in ds.train_x + ds.test + ds.val:
        assert split[it.label] == class_index(it)
        assert it.classname == fake_classname(class_index(it))
    assert all("/images/train/" in it.impath for it in ds.train_x)
    # test: every val image of the ID classes; val: 4 per class drawn from test (a subset, as official)
    assert len(ds.test) == N_ID * N_VAL
    assert all("/images/val/" in it.impath for it in ds.test)
    assert len(ds.val) == N_ID * 4
    assert set(ds.val) <= set(ds.test)
    # ood_test: held-out classes only (fewer than 1000 images here -> all of them), label -1
    held_out = set(range(N_CLASSES)) - set(split)
    assert len(ds.ood_test) == len(held_out) * N_VAL
    assert all(it.label == -1 and class_index(it) in held_out for it in ds.ood_test)
    assert ds.split_record()["id_wnids"] == [fake_wnid(i) for i in split]


def test_imagenet46_ood_size_and_all_shots(root):
    ds = build(ImageNet46, make_cfg(root, shots=-1, **{"DATASET.SETUP1_OOD_SIZE": 10}))
    assert len(ds.ood_test) == 10 and len(set(ds.ood_test)) == 10
    assert all(it.label == -1 for it in ds.ood_test)
    assert len(ds.train_x) == N_ID * N_TRAIN  # K < 1: all ID train images


def test_imagenet46_deterministic(root):
    a = build(ImageNet46, make_cfg(root, seed=2, shots=1, **{"DATASET.SETUP1_OOD_SIZE": 5}))
    b = build(ImageNet46, make_cfg(root, seed=2, shots=1, **{"DATASET.SETUP1_OOD_SIZE": 5}))
    for split in ("train_x", "val", "test", "ood_test"):
        assert [it.impath for it in getattr(a, split)] == [it.impath for it in getattr(b, split)]
    c = build(ImageNet46, make_cfg(root, seed=3, shots=1))
    assert c.class_split != a.class_split


def test_fewshot_draws_from_ood_group_first(root):
    """Official stream: the K-shot sampler also draws K images from the single label -1 group."""
    cfg = make_cfg(root, seed=1, shots=1)
    ds = build(ImageNet46, cfg)
    random.seed(1)
    full = ds.read_imagenet_split("train")
    n_groups = len({it.label for it in full})
    assert n_groups == N_ID + 1
    expected = [it for it in ds.generate_fewshot_dataset(full, num_shots=1) if it.label >= 0]
    assert [it.impath for it in ds.train_x] == [it.impath for it in expected]


# ------------------------------------------------------------------------------------------------ ImageNetOOD46
def test_imagenetood46_test_id(root):
    ds = build(ImageNetOOD46, make_cfg(root, shots=-1))
    assert ds.train_x == []
    assert len(ds.test) == N_ID * N_VAL and len(ds.val) == N_ID * 4
    assert set(ds.val) <= set(ds.test)
    assert ds.num_classes == N_ID


@pytest.mark.parametrize("variant,classes", [("imagenet_v2", range(N_CLASSES)), ("imagenet_s", range(N_CLASSES)),
                                             ("imagenet_a", AR_CLASSES), ("imagenet_r", AR_CLASSES)])
def test_imagenetood46_variants(root, variant, classes):
    if variant in ("imagenet_a", "imagenet_r"):  # the real A/R ship a README.txt next to the class folders
        assert any(name == "README.txt" for _, _, files in os.walk(root) for name in files)
    ds = build(ImageNetOOD46, make_cfg(root, seed=1, shots=-1, TEST_OOD=variant))
    split = ds.class_split
    kept = [c for c in classes if c in split]
    assert len(ds.test) == len(kept) * N_VAR
    for it in ds.test:
        folder = os.path.basename(os.path.dirname(it.impath))
        idx = int(folder) if variant == "imagenet_v2" else int(folder[2:])
        assert split[it.label] == idx
        assert it.classname == fake_classname(idx)
    # classification stays N_ID-way with the ID names in label order, even when A/R cover fewer classes
    assert ds.num_classes == N_ID
    assert ds.classnames == [fake_classname(i) for i in split]
    assert len(ds.ood_test) == (N_CLASSES - N_ID) * N_VAL


def test_imagenetood46_same_split_as_training(root):
    a = build(ImageNet46, make_cfg(root, seed=3))
    b = build(ImageNetOOD46, make_cfg(root, seed=3, shots=-1, TEST_OOD="imagenet_s"))
    assert a.class_split == b.class_split and a.classnames == b.classnames


@pytest.mark.parametrize("seed", [2, 3])
def test_shared_cache_open_set_sample(root, seed):
    """Official: seed S>1 evaluation groups held-out images by seed 1's labels (spec 4.1, seedless pickle)."""
    size = 10
    seed1_id = set(np.random.RandomState(1).permutation(N_CLASSES)[:N_ID].tolist())
    held = set(range(N_CLASSES)) - set(np.random.RandomState(seed).permutation(N_CLASSES)[:N_ID].tolist())
    own_group = held & seed1_id  # held out now, ID in seed 1: a labelled group of N_VAL < size images, all kept
    shared = held - seed1_id     # held out in both: the one -1 group, sampled
    assert own_group and len(shared) * N_VAL > size
    ds = build(ImageNetOOD46, make_cfg(root, seed=seed, shots=-1, **{"DATASET.SETUP1_OOD_SIZE": size}))
    assert ds.protocol_notes()["setup1_ood_sample"] == "shared_cache"
    got = [class_index(it) for it in ds.ood_test]
    assert len(got) == len(own_group) * N_VAL + size
    assert all(got.count(c) == N_VAL for c in own_group)
    assert sum(c in shared for c in got) == size and all(it.label == -1 for it in ds.ood_test)
    per_seed = build(ImageNetOOD46, make_cfg(root, seed=seed, shots=-1, **{"DATASET.SETUP1_OOD_SIZE": size,
                                                                           "DATASET.SETUP1_OOD_SAMPLE": "per_seed"}))
    assert len(per_seed.ood_test) == size and per_seed.protocol_notes()["setup1_ood_sample"] == "per_seed"
    # training runs (seeded official cache) and seed 1 always sample per seed
    train = build(ImageNet46, make_cfg(root, seed=seed, **{"DATASET.SETUP1_OOD_SIZE": size}))
    assert len(train.ood_test) == size and train.protocol_notes()["setup1_ood_sample"] == "per_seed"
    one = build(ImageNetOOD46, make_cfg(root, seed=1, shots=-1, **{"DATASET.SETUP1_OOD_SIZE": size}))
    assert len(one.ood_test) == size and one.protocol_notes()["setup1_ood_sample"] == "per_seed"
    with pytest.raises(ConfigError, match="SETUP1_OOD_SAMPLE"):
        build(ImageNetOOD46, make_cfg(root, seed=seed, shots=-1, **{"DATASET.SETUP1_OOD_SAMPLE": "fresh"}))


# ------------------------------------------------------------------------------------------------ errors
def test_missing_folders(tmp_path):
    with pytest.raises(DataError, match="imagenet"):
        ImageNet46(make_cfg(str(tmp_path)))
    os.makedirs(tmp_path / "imagenet")
    with pytest.raises(DataError, match="classnames.txt"):
        ImageNet46(make_cfg(str(tmp_path)))
    write_imagenet_tree(str(tmp_path), n_classes=5, n_train=1, n_val=1, variants=False)
    shutil.rmtree(tmp_path / "imagenet" / "images" / "train")
    with pytest.raises(DataError, match=r"images/train"):
        ImageNet46(make_cfg(str(tmp_path)))
    ImageNetOOD46(make_cfg(str(tmp_path), shots=-1))  # evaluation does not need the train images
    for variant in TEST_OOD_CHOICES[1:]:
        with pytest.raises(DataError, match="folder not found") as err:
            ImageNetOOD46(make_cfg(str(tmp_path), shots=-1, TEST_OOD=variant))
        assert str(tmp_path) in str(err.value)
    shutil.rmtree(tmp_path / "imagenet" / "images" / "val")
    with pytest.raises(DataError, match=r"images/val"):
        ImageNetOOD46(make_cfg(str(tmp_path), shots=-1))


def test_config_errors(root):
    with pytest.raises(ConfigError, match="TEST_OOD"):
        ImageNetOOD46(make_cfg(root, TEST_OOD="imagenet_x"))
    with pytest.raises(ConfigError, match="seed"):
        ImageNet46(make_cfg(root, seed=-1))


def test_malformed_classnames(tmp_path):
    os.makedirs(tmp_path / "imagenet")
    (tmp_path / "imagenet" / "classnames.txt").write_text("n0001\n")
    with pytest.raises(DataError, match="malformed line 1"):
        ImageNet46(make_cfg(str(tmp_path)))


# ------------------------------------------------------------------------------------------------ configs
def test_config_hook_and_yaml_files():
    cfg = get_cfg_default()
    add_setup1_config(cfg)
    assert cfg.TEST_OOD == "test_id" and cfg.DATASET.SETUP1_OOD_SIZE == 1000
    cfg.TEST_OOD = "imagenet_a"
    add_setup1_config(cfg)  # idempotent, keeps values
    assert cfg.TEST_OOD == "imagenet_a"
    import train
    from trainers.croft import dataset_semantics

    coop = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "CoOp")
    for name, ds_name in (("imagenet46.yaml", "ImageNet46"), ("imagenetood46.yaml", "ImageNetOOD46")):
        cfg = get_cfg_default()
        train.extend_cfg(cfg)
        add_setup1_config(cfg)
        cfg.merge_from_file(os.path.join(coop, "configs", "datasets", name))
        assert cfg.DATASET.NAME == ds_name
        assert dataset_semantics(cfg)[1] == ("ensemble7", "sum_meansq", True)
        assert cfg.TEST.OOD_ID_SPLIT == "val"
