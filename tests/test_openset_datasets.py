"""Open-set evaluation datasets (``PACS_DTD`` & co., ``CoOp/datasets/openset.py``) on synthetic trees."""
from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter

import pytest

import datasets.openset as openset  # noqa: F401  (registers the classes)
from dassl.config import get_cfg_default
from dassl.data import DataManager
from dassl.data.datasets import DATASET_REGISTRY, build_dataset
from dassl.utils.errors import DataError
from synthetic import write_lodo_tree
from synthetic_openset import (CALTECH101_CLASSES, DTD_CLASSES, FOOD101_CLASSES, write_all_openset,
                               write_coop_tree)

PACS_CLASSES = ("dog", "elephant", "giraffe")
VLCS_CLASSES = ("bird", "car", "chair")
VLCS_DOMAINS = ("CALTECH", "LABELME", "PASCAL", "SUN")  # upper-case folders, lower-case json names
PER_CLASS = 8
NAMES = ["PACS_DTD", "PACS_Food101", "PACS_Caltech101", "PACS_food101",
         "VLCS_DTD", "VLCS_Food101", "VLCS_Caltech101", "VLCS_food101"]
OOD_CLASSNAMES = {
    "DTD": list(DTD_CLASSES),
    "Food101": list(FOOD101_CLASSES),
    "food101": list(FOOD101_CLASSES),
    "Caltech101": [c if isinstance(c, str) else c[1] for c in CALTECH101_CLASSES],
}
ENV = {"PACS": "sketch", "VLCS": "caltech"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    r = str(tmp_path_factory.mktemp("data"))
    write_lodo_tree(r, "PACS", classes=PACS_CLASSES, per_class=PER_CLASS)
    base = write_lodo_tree(r, "VLCS", domains=VLCS_DOMAINS, classes=VLCS_CLASSES, per_class=PER_CLASS)
    for d in VLCS_DOMAINS:
        os.replace(os.path.join(base, f"test_on_{d}.json"), os.path.join(base, f"test_on_{d.lower()}.json"))
    write_all_openset(r)
    return r


def make_cfg(root: str, name: str, id_cap: int = 5, ood_cap: int = 3, shots: int = -1, env: str = ""):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT = root
    cfg.DATASET.NAME = name
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.ID_PER_CLASS_CAP = id_cap
    cfg.DATASET.OOD_PER_CLASS_CAP = ood_cap
    cfg.DATASET.DOMAIN_MATCH = "folder"  # named fix: upper-case VLCS folders keep their four domains
    cfg.TEST_ENV = env or ENV[name.split("_")[0]]
    cfg.VERBOSE = False
    return cfg


def build(cfg, seed: int = 1):
    random.seed(seed)
    return build_dataset(cfg)


def json_split(root: str, name: str) -> dict:
    idn = name.split("_")[0]
    with open(os.path.join(root, idn, f"test_on_{ENV[idn]}.json"), encoding="utf-8") as f:
        return json.load(f)


def test_registered_names():
    for name in NAMES:
        assert name in DATASET_REGISTRY
    assert issubclass(DATASET_REGISTRY.get("PACS_food101"), openset.PACS_Food101)
    assert openset.PACS_DTD.dataset_dir == "PACS" and openset.VLCS_DTD.dataset_dir == "VLCS"
    assert openset.PACS_DTD.official_sampler == "balance" and openset.VLCS_DTD.official_sampler == "plain"


@pytest.mark.parametrize("name", NAMES)
def test_splits_caps_and_classes(root, name):
    idn, oodn = name.split("_")
    ds = build(make_cfg(root, name))
    split = json_split(root, name)
    id_classes = list(PACS_CLASSES if idn == "PACS" else VLCS_CLASSES)
    # ID label space only
    assert ds.num_classes == 3 and ds.classnames == id_classes and ds.classnames_o == id_classes
    assert ds.lab2cname == dict(enumerate(id_classes))
    # train_x = full json train (NUM_SHOTS -1)
    root_img = os.path.join(root, idn, "images")
    assert [d.impath for d in ds.train_x] == [os.path.join(root_img, e[0]) for e in split["train"]]
    # test: capped per class, held-out domain only, subset of json test
    test_paths = {os.path.join(root_img, e[0]) for e in split["test"]}
    assert Counter(d.label for d in ds.test) == {0: 5, 1: 5, 2: 5}
    assert {d.impath for d in ds.test} <= test_paths
    assert {d.domainname for d in ds.test} == {ENV[idn]}
    # val: from json train (not json val), capped
    train_paths = {os.path.join(root_img, e[0]) for e in split["train"]}
    assert Counter(d.label for d in ds.val) == {0: 5, 1: 5, 2: 5}
    assert {d.impath for d in ds.val} <= train_paths
    assert len({d.domain for d in ds.val}) == 3
    # ood_test: open-set classes, capped, exclusions applied
    names = Counter(d.classname for d in ds.ood_test)
    assert max(names.values()) <= 3
    expected = [c for c in OOD_CLASSNAMES[oodn] if c not in getattr(openset, name).ood_exclude]
    assert sorted(names) == sorted(expected)
    assert all(os.path.isfile(d.impath) for d in ds.ood_test)
    assert all(d.domain == -1 for d in ds.ood_test)
    if oodn == "Caltech101":
        excl = openset.PACS_CALTECH_EXCLUDE if idn == "PACS" else openset.VLCS_CALTECH_EXCLUDE
        assert not set(names) & set(excl)
        assert "dalmatian" not in names and "airplane" not in names and "face" not in names
        assert "accordion" in names and "ketch" in names
        if idn == "PACS":  # chair/emu are ID-overlapping only for VLCS; elephant only for PACS
            assert "chair" in names and "emu" in names and "elephant" not in names
        else:
            assert "chair" not in names and "emu" not in names and "elephant" in names


def test_exclusion_lists_exact():
    assert openset.PACS_Caltech101.ood_exclude == (
        "airplane", "dalmatian", "electric_guitar", "elephant", "face", "leopard", "motorbike", "snoopy")
    assert openset.VLCS_Caltech101.ood_exclude == (
        "airplane", "car_side", "chair", "dalmatian", "emu", "face", "flamingo", "flamingo_head", "ibis",
        "leopard", "motorbike", "pigeon", "snoopy", "wheelchair", "wild_cat", "windsor_chair")
    assert openset.PACS_DTD.ood_exclude == () and openset.VLCS_food101.ood_exclude == ()


def test_no_cap_and_large_cap(root):
    ds = build(make_cfg(root, "PACS_DTD", id_cap=500, ood_cap=100))
    split = json_split(root, "PACS_DTD")
    assert len(ds.test) == len(split["test"]) and len(ds.val) == len(split["train"])
    assert len(ds.ood_test) == len(DTD_CLASSES) * 9  # 4 + 2 + 3 per class
    ds0 = build(make_cfg(root, "PACS_DTD", id_cap=0, ood_cap=0))
    assert len(ds0.test) == len(split["test"]) and len(ds0.ood_test) == len(DTD_CLASSES) * 9


def test_ood_labels_do_not_change_id_classes(tmp_path):
    write_lodo_tree(str(tmp_path), "PACS", classes=("dog", "horse"), per_class=3)
    # more open-set classes (with larger labels) than ID classes
    write_coop_tree(str(tmp_path), "dtd", "images", "split_zhou_DescribableTextures.json",
                    [f"tex{i}" for i in range(6)], counts=(1, 1, 1))
    ds = build(make_cfg(str(tmp_path), "PACS_DTD", env="photo"))
    assert ds.num_classes == 2 and ds.classnames == ["dog", "horse"]
    assert max(d.label for d in ds.ood_test) == 5


def test_determinism(root):
    def paths(ds):
        return ([d.impath for d in ds.train_x], [d.impath for d in ds.val], [d.impath for d in ds.test],
                [d.impath for d in ds.ood_test])

    for name in ("PACS_Caltech101", "VLCS_DTD"):
        a = paths(build(make_cfg(root, name, shots=2), seed=3))
        b = paths(build(make_cfg(root, name, shots=2), seed=3))
        c = paths(build(make_cfg(root, name, shots=2), seed=4))
        assert a == b
        assert a != c


def test_fewshot_train_x_keeps_full_val(root):
    split = json_split(root, "PACS_DTD")
    for name in ("PACS_DTD", "VLCS_DTD", "PACS_food101"):
        ds = build(make_cfg(root, name, id_cap=500, shots=2))
        # plain sampler (VLCS; PACS's official "balance" sampler falls back to it for K <= 4)
        assert Counter(d.label for d in ds.train_x) == {0: 2, 1: 2, 2: 2}
        # val is NOT cut to K per class (the official PACS_DTD inconsistency is not reproduced)
        assert len(ds.val) == len(split["train"])
        assert ds.num_classes == 3


def test_vlcs_uppercase_domains(root):
    ds = build(make_cfg(root, "VLCS_Food101", env="caltech"))
    assert {d.domainname for d in ds.test} == {"caltech"}
    assert {d.domainname for d in ds.val} == {"labelme", "pascal", "sun"}
    assert all("/CALTECH/" in d.impath for d in ds.test)
    official = make_cfg(root, "VLCS_Food101", env="caltech")
    official.DATASET.DOMAIN_MATCH = "substring"   # official: case-sensitive substrings -> every image is 'sun'
    ds = build(official)
    assert {(d.domain, d.domainname) for d in ds.test + ds.val} == {(3, "sun")}


def test_missing_ood_folder_and_split(tmp_path):
    r = str(tmp_path)
    write_lodo_tree(r, "PACS", classes=("dog", "horse"), per_class=2)
    with pytest.raises(DataError, match=r"open-set folder not found: .*dtd.*split_zhou_DescribableTextures"):
        build(make_cfg(r, "PACS_DTD", env="photo"))
    base = write_coop_tree(r, "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", ["ketch"],
                           counts=(1, 1, 1))
    os.remove(os.path.join(base, "split_zhou_Caltech101.json"))
    with pytest.raises(DataError, match=r"split file not found: .*caltech-101.*split_zhou_Caltech101\.json"):
        build(make_cfg(r, "PACS_Caltech101", env="photo"))
    write_coop_tree(r, "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", ["ketch"],
                    counts=(1, 1, 1))
    shutil.rmtree(os.path.join(base, "101_ObjectCategories"))
    with pytest.raises(DataError, match=r"image folder not found: .*101_ObjectCategories"):
        build(make_cfg(r, "PACS_Caltech101", env="photo"))
    # ID side missing: the LODO error
    with pytest.raises(DataError, match=r"VLCS"):
        build(make_cfg(r, "VLCS_Caltech101", env="sun"))


def test_malformed_split(tmp_path):
    r = str(tmp_path)
    write_lodo_tree(r, "PACS", classes=("dog",), per_class=2)
    base = write_coop_tree(r, "food-101", "images", "split_zhou_Food101.json", ["pizza"], counts=(1, 1, 1))
    with open(os.path.join(base, "split_zhou_Food101.json"), "w", encoding="utf-8") as f:
        json.dump({"train": [], "val": []}, f)
    with pytest.raises(DataError, match="has no 'test' list"):
        build(make_cfg(r, "PACS_Food101", env="photo"))
    with open(os.path.join(base, "split_zhou_Food101.json"), "w", encoding="utf-8") as f:
        json.dump({"train": [["pizza/x.png"]], "val": [], "test": []}, f)
    with pytest.raises(DataError, match="malformed entry"):
        build(make_cfg(r, "PACS_Food101", env="photo"))


def test_read_coop_split(root):
    image_dir = os.path.join(root, "caltech-101", "101_ObjectCategories")
    split_path = os.path.join(root, "caltech-101", "split_zhou_Caltech101.json")
    items = openset.read_coop_split(image_dir, split_path)
    assert len(items) == len(CALTECH101_CLASSES) * 5
    first = items[0]
    assert first.impath == os.path.join(image_dir, "accordion", "accordion_0000.png") and first.label == 0
    assert any(d.classname == "airplane" and "/airplanes/" in d.impath for d in items)
    kept = openset.read_coop_split(image_dir, split_path, exclude=("airplane", "face"), keys=("test",))
    assert len(kept) == (len(CALTECH101_CLASSES) - 2) * 2
    assert not {"airplane", "face"} & {d.classname for d in kept}


def test_datamanager_iterates(root):
    cfg = make_cfg(root, "VLCS_Caltech101")
    cfg.INPUT.SIZE = (32, 32)
    cfg.DATALOADER.TEST.BATCH_SIZE = 4
    random.seed(0)
    dm = DataManager(cfg)
    assert dm.num_classes == 3
    batch = next(iter(dm.ood_test_loader))
    assert tuple(batch["img"].shape) == (4, 3, 32, 32)
    batch = next(iter(dm.test_loader))
    assert tuple(batch["img"].shape[1:]) == (3, 32, 32)


def test_check_data_command(tmp_path, capsys):
    """tools/check_data.py builds every dataset like train.py and names what is missing."""
    import importlib.util
    import os

    from helpers import COOP
    from synthetic import write_lodo_tree
    from synthetic_openset import write_all_openset

    write_lodo_tree(str(tmp_path), per_class=3)
    write_all_openset(str(tmp_path))
    spec = importlib.util.spec_from_file_location("check_data", os.path.join(COOP, "tools", "check_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--root", str(tmp_path), "--datasets", "PACS", "PACS_DTD", "--check-images"]) == 0
    out = capsys.readouterr().out
    assert "[ ok ] PACS [test_on_sketch]: 3 classes" in out and "ood_test" in out
    assert mod.main(["--root", str(tmp_path), "--datasets", "VLCS", "ImageNet46"]) == 1
    out = capsys.readouterr().out
    assert out.count("[FAIL] VLCS") == 1 and "VLCS/images" in out and "imagenet" in out
