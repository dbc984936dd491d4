"""Open-set evaluation datasets (``PACS_DTD`` & co., ``CoOp/datasets/openset.py``) on synthetic trees, with
``DATASET.NUM_SHOTS`` K >= 1 (the official K-shot draws, CoOp's ``split_fewshot`` caches both ways), the official
draw order (``DATASET.OPENSET_DRAW_ORDER``), the vendored Dassl samplers and ``Datum`` pickles against the official
``base_dataset.py``, and the Setup-II drivers' DPLCLIP / Bayes-CAL evaluation plans."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import sys
import types
from collections import Counter

import numpy as np
import pytest

import datasets.openset as openset  # noqa: F401  (registers the classes)
from dassl.config import get_cfg_default
from dassl.data import DataManager
from dassl.data.datasets import DATASET_REGISTRY, Datum, DatasetBase, build_dataset
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

    def fresh(name, seed):  # no few-shot cache yet: the run draws (and writes) it
        clear_caches(root)
        return paths(build(make_cfg(root, name, shots=2), seed=seed))

    for name in ("PACS_Caltech101", "VLCS_DTD"):
        a, b, c = fresh(name, 3), fresh(name, 3), fresh(name, 4)
        assert a == b
        assert a != c
        # runs reading the cache agree with each other (officially not with the run that drew it: one draw less)
        assert paths(build(make_cfg(root, name, shots=2), seed=3)) == paths(build(make_cfg(root, name, shots=2),
                                                                                  seed=3))
    clear_caches(root)


def test_fewshot_train_x_and_val(root):
    for name in ("PACS_DTD", "VLCS_DTD", "PACS_food101"):
        split = json_split(root, name)
        ds = build(make_cfg(root, name, id_cap=500, shots=2))
        # plain sampler (VLCS; PACS's official "balance" sampler falls back to it for K <= 4)
        assert Counter(d.label for d in ds.train_x) == {0: 2, 1: 2, 2: 2}
        # val = the json train list, except PACS_DTD's (official): its cut to K per class
        want = {0: 2, 1: 2, 2: 2} if name == "PACS_DTD" else Counter(e[1] for e in split["train"])
        assert Counter(d.label for d in ds.val) == want
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


# ----------------------------------------------------------------------------------------- DATASET.NUM_SHOTS K >= 1
# The official <ID>_<OOD> classes (CoOp/datasets/PACS_DTD.py, PACS_food101.py, PACS_Caltech101.py, VLCS_*.py) and
# spec 4.2 / 7.3: with K >= 1 the open-set train/val become their K-shot / min(K, 4)-shot draws (CoOp's
# split_fewshot/shot_<K>-seed_<S>.pkl) before the union and the 100-per-class cap. The expected draws below are
# computed here with random.Random from that description, independently of the project's samplers.
K = 16
KSHOT_CLASSES = ("dog", "elephant", "giraffe")


@pytest.fixture(scope="module")
def kroot(tmp_path_factory) -> str:
    """PACS/VLCS with 18 train and 18 val images per class (so K = 16 really samples both), DTD-like 60/24/36."""
    from synthetic_openset import write_dtd_counts_like, write_food101_like

    r = str(tmp_path_factory.mktemp("kshot"))
    write_lodo_tree(r, "PACS", classes=KSHOT_CLASSES, per_class=12, val_fraction=0.5, size=16)
    base = write_lodo_tree(r, "VLCS", domains=VLCS_DOMAINS, classes=KSHOT_CLASSES, per_class=12,
                           val_fraction=0.5, size=16)
    for d in VLCS_DOMAINS:
        os.replace(os.path.join(base, f"test_on_{d}.json"), os.path.join(base, f"test_on_{d.lower()}.json"))
    write_dtd_counts_like(r)
    write_food101_like(r, counts=(20, 6, 3))
    return r


def kcfg(root: str, name: str, seed: int = 1, shots: int = K, id_cap: int = 20, ood_cap: int = 100):
    cfg = make_cfg(root, name, id_cap=id_cap, ood_cap=ood_cap, shots=shots)
    cfg.SEED = seed
    return cfg


def kbuild(cfg):
    return build(cfg, seed=cfg.SEED)


def clear_caches(root: str) -> None:
    for folder in ("dtd", "food-101", "caltech-101"):
        shutil.rmtree(os.path.join(root, folder, "split_fewshot"), ignore_errors=True)


def entries(root: str, name: str) -> tuple[dict, dict]:
    """(ID json lists, open-set json lists) as (path, label, domain folder) tuples in file order."""
    idn = name.split("_")[0]
    ood_folder = {"DTD": "dtd", "Food101": "food-101", "food101": "food-101"}[name.split("_")[1]]
    ood_file = {"dtd": "split_zhou_DescribableTextures.json", "food-101": "split_zhou_Food101.json"}[ood_folder]
    with open(os.path.join(root, idn, f"test_on_{ENV[idn]}.json"), encoding="utf-8") as f:
        id_split = json.load(f)
    with open(os.path.join(root, ood_folder, ood_file), encoding="utf-8") as f:
        ood_split = json.load(f)
    idl = {k: [(os.path.join(root, idn, "images", e[0]), e[1], e[0].split("/")[0].lower()) for e in v]
           for k, v in id_split.items()}
    oodl = {k: [(os.path.join(root, ood_folder, "images", e[0]), e[1], "") for e in v] for k, v in ood_split.items()}
    return idl, oodl


def by_label(items):
    groups: dict = {}
    for it in items:
        groups.setdefault(it[1], []).append(it)
    return groups


def plain(rng, items, k):
    """generate_fewshot_dataset (spec 7.3): per label (first appearance), sample K if it has >= K, else all."""
    if k < 1:
        return list(items)
    out = []
    for group in by_label(items).values():
        out.extend(rng.sample(group, k) if len(group) >= k else group)
    return out


def balance(rng, items, k):
    """generate_fewshot_dataset_balance with its bug (spec 7.3): per label with >= K items, int(K / #domains)
    items from each domain of the *whole* source (first appearance order), regardless of class."""
    domains: dict = {}
    for it in items:
        domains.setdefault(it[2], []).append(it)
    per = int(k / len(domains))
    out = []
    for group in by_label(items).values():
        if len(group) >= k:
            for dom in domains.values():
                out.extend(rng.sample(dom, per) if len(dom) >= per else dom)
        else:
            out.extend(group)
    return out


def cap(rng, items, c):
    """The official caps, ``generate_fewshot_dataset(items, num_shots=c)``: the plain sampler (labels with at
    least ``c`` items are sampled, so exactly ``c`` are reordered); ``c < 1``: no cap."""
    return plain(rng, items, c)


def expected_draws(root: str, name: str, seed: int, k: int = K, id_cap: int = 20, ood_cap: int = 100,
                   order: str = "official", cache: dict | None = None) -> dict:
    """Every split of ``name`` for the seed, from the official classes' steps: ``train_x``, the cuts, the open-set
    few-shot draw (CoOp's cache; ``cache`` given: the file is read, nothing drawn), then the caps.
    ``official``: ``ood_test``, ``val``, ``test``, from the state after the few-shot draw (as the official
    ``PACS_food101.py`` & co.); ``id_first``: ``test``, ``val``, ``ood_test`` from the state before it."""
    idl, oodl = entries(root, name)
    rng = random.Random(seed)
    pacs = name.startswith("PACS")
    train_x = (balance if pacs and k > 4 else plain)(rng, idl["train"], k)
    val_source = plain(rng, idl["train"], k) if name == "PACS_DTD" else idl["train"]
    (balance if pacs and k > 4 and name != "PACS_DTD" else plain)(rng, idl["val"], k)  # drawn and discarded
    if k < 1:
        cache = {"train": oodl["train"], "val": oodl["val"]}
    elif cache is None:
        state = rng.getstate()
        cache = {"train": plain(rng, oodl["train"], k), "val": plain(rng, oodl["val"], min(k, 4))}
        if order == "id_first":
            rng.setstate(state)
    sources = {"test": (idl["test"], id_cap), "val": (val_source, id_cap),
               "ood_test": (cache["train"] + cache["val"] + oodl["test"], ood_cap)}
    steps = ("ood_test", "val", "test") if order == "official" else ("test", "val", "ood_test")
    out = {split: cap(rng, *sources[split]) for split in steps}
    return {"train_x": train_x, **out, "cache": cache}


def paths(items):
    return [d.impath if isinstance(d, Datum) else d[0] for d in items]


def ocfg(root: str, name: str, order: str, **kw):
    cfg = kcfg(root, name, **kw)
    cfg.DATASET.OPENSET_DRAW_ORDER = order
    return cfg


@pytest.mark.parametrize("order", ["official", "id_first"])
@pytest.mark.parametrize("name", ["PACS_DTD", "PACS_Food101", "VLCS_DTD"])
def test_kshot_draws_are_the_official_draws(kroot, name, order):
    """Small caps (12 of 18 source images, 3 of the held-out ones, 20 of each open-set class) so every cap draws."""
    clear_caches(kroot)
    caps = {"id_cap": 12, "ood_cap": 20}
    ds = kbuild(ocfg(kroot, name, order, seed=2, **caps))
    want = expected_draws(kroot, name, seed=2, order=order, **caps)
    for split in ("train_x", "val", "test", "ood_test"):
        assert paths(getattr(ds, split)) == paths(want[split]), split
    assert ds.data_report()["open_set"]["fewshot_cache"]["state"] == "written"
    assert ds.protocol_notes()["open_set"]["draw_order"] == order
    # the same run again, now reading the file it wrote: officially the caps start from the state without the
    # draw (the first run of a seed and the later ones differ); id_first restored it, so nothing changes
    again = kbuild(ocfg(kroot, name, order, seed=2, **caps))
    assert again.data_report()["open_set"]["fewshot_cache"]["state"] == "loaded"
    read = expected_draws(kroot, name, seed=2, order=order, cache=want["cache"], **caps)
    for split in ("train_x", "val", "test", "ood_test"):
        assert paths(getattr(again, split)) == paths(read[split]), split
    assert (paths(again.test) == paths(ds.test)) is (order == "id_first")


def test_kshot_counts_dtd_like(kroot):
    """DTD's 60/24/36 per class: 16 + 4 + 36 = 56 open-set images per class with K = 16, 100 (the cap) with -1."""
    clear_caches(kroot)
    for name in ("PACS_DTD", "VLCS_DTD"):
        ds = kbuild(kcfg(kroot, name))
        assert Counter(d.classname for d in ds.ood_test) == {"banded": 56, "blotchy": 56}
        assert {d.domain for d in ds.ood_test} == {-1} and {d.domainname for d in ds.ood_test} == {"dtd"}
        assert ds.protocol_notes()["open_set"]["ood_trainval"] == "16-shot/4-shot"
        ds = kbuild(kcfg(kroot, name, shots=-1))
        assert Counter(d.classname for d in ds.ood_test) == {"banded": 100, "blotchy": 100}
    ds = kbuild(kcfg(kroot, "PACS_Food101"))  # 20/6/3 per class: 16 + 4 + 3
    assert Counter(d.classname for d in ds.ood_test) == {c: 23 for c in FOOD101_CLASSES}


def test_k_minus_one_draws_in_the_official_order(kroot):
    """K = -1 (the official evaluation scripts): no cache; the official classes cap ``ood_test`` (the full union)
    first, then ``val`` (json train), then ``test``, so the ID samples depend on the open set drawn before them."""
    clear_caches(kroot)
    for name in ("PACS_DTD", "VLCS_Food101"):
        ds = kbuild(kcfg(kroot, name, seed=3, shots=-1, id_cap=3, ood_cap=5))
        idl, oodl = entries(kroot, name)
        rng = random.Random(3)
        assert paths(ds.train_x) == paths(idl["train"])
        assert paths(ds.ood_test) == paths(cap(rng, oodl["train"] + oodl["val"] + oodl["test"], 5))
        assert paths(ds.val) == paths(cap(rng, idl["train"], 3))
        assert paths(ds.test) == paths(cap(rng, idl["test"], 3))
        assert ds.protocol_notes()["open_set"] == {"num_shots": -1, "ood_trainval": "full", "id_val": "train",
                                                  "draw_order": "official"}
        assert ds.data_report()["open_set"]["fewshot_cache"] == {}
    assert not os.path.exists(os.path.join(kroot, "dtd", "split_fewshot"))
    # the ID samples of PACS_DTD and PACS_Food101 differ (their open-set caps consume different draws) ...
    a, b = (kbuild(kcfg(kroot, n, seed=3, shots=-1, id_cap=3, ood_cap=5)) for n in ("PACS_DTD", "PACS_Food101"))
    assert paths(a.test) != paths(b.test) and paths(a.train_x) == paths(b.train_x)
    # ... unless no class reaches a cap (nothing drawn; 9 held-out images per class here)
    a, b = (kbuild(kcfg(kroot, n, seed=3, shots=-1, id_cap=500, ood_cap=500)) for n in ("PACS_DTD", "PACS_Food101"))
    assert paths(a.test) == paths(b.test) and paths(a.val) == paths(b.val)


def test_id_first_order_never_depends_on_the_open_set(kroot):
    """The named deviation ``DATASET.OPENSET_DRAW_ORDER id_first``: test, val, then ood_test (K = -1 and K >= 1);
    only the official ``PACS_DTD``'s extra K-shot cut (K >= 1) gives it other ID samples than its siblings."""
    clear_caches(kroot)
    for shots in (-1, K):
        built = {n: kbuild(ocfg(kroot, n, "id_first", shots=shots, id_cap=3, ood_cap=5))
                 for n in ("VLCS_Food101", "VLCS_DTD")}
        for split in ("train_x", "val", "test"):
            assert paths(getattr(built["VLCS_Food101"], split)) == paths(getattr(built["VLCS_DTD"], split))
    a, b = (kbuild(ocfg(kroot, n, "id_first", id_cap=3, ood_cap=5)) for n in ("PACS_DTD", "PACS_Food101"))
    assert paths(a.test) != paths(b.test)
    ds = kbuild(ocfg(kroot, "VLCS_Food101", "id_first", seed=3, shots=-1, id_cap=3, ood_cap=5))
    idl, oodl = entries(kroot, "VLCS_Food101")
    rng = random.Random(3)
    assert paths(ds.test) == paths(cap(rng, idl["test"], 3))
    assert paths(ds.val) == paths(cap(rng, idl["train"], 3))
    assert paths(ds.ood_test) == paths(cap(rng, oodl["train"] + oodl["val"] + oodl["test"], 5))


def test_draw_order_key_is_checked_recorded_and_fingerprinted(kroot):
    from dassl.config.validate import validate_cfg
    from dassl.engine.identity import run_identity
    from dassl.engine.protocol import SWITCHES, protocol_block
    from dassl.utils.errors import ConfigError

    cfg = kcfg(kroot, "PACS_DTD")
    assert cfg.DATASET.OPENSET_DRAW_ORDER == "official" == SWITCHES["DATASET.OPENSET_DRAW_ORDER"]
    cfg.DATASET.OPENSET_DRAW_ORDER = "ood_last"
    with pytest.raises(ConfigError, match="DATASET.OPENSET_DRAW_ORDER"):
        validate_cfg(cfg)
    with pytest.raises(ConfigError, match=r"DATASET.OPENSET_DRAW_ORDER must be one of official, id_first"):
        kbuild(cfg)
    official, id_first = kcfg(kroot, "PACS_DTD"), ocfg(kroot, "PACS_DTD", "id_first")
    assert run_identity(official)["fingerprint"] != run_identity(id_first)["fingerprint"]
    fixed = {c.DATASET.OPENSET_DRAW_ORDER: set(protocol_block(c)["fixed"]) for c in (official, id_first)}
    assert fixed["id_first"] - fixed["official"] == {"DATASET.OPENSET_DRAW_ORDER"}


def test_pacs_dtd_val_is_cut_to_k(kroot):
    """Official PACS_DTD only: val drawn from the json train list cut to K per class (18 -> 16 here)."""
    clear_caches(kroot)
    full = {0: 18, 1: 18, 2: 18}
    for name, shots, want in [("PACS_DTD", K, {0: 16, 1: 16, 2: 16}), ("PACS_DTD", 2, {0: 2, 1: 2, 2: 2}),
                              ("PACS_DTD", -1, full), ("PACS_Food101", K, full), ("VLCS_DTD", K, full)]:
        ds = kbuild(kcfg(kroot, name, shots=shots, id_cap=500))
        assert Counter(d.label for d in ds.val) == want, (name, shots)
        cut = shots >= 1 and name == "PACS_DTD"
        assert ds.protocol_notes()["open_set"]["id_val"] == ("train cut to K per class" if cut else "train")


def test_open_sets_of_one_id_dataset_share_a_pass():
    """``pass_key``: every open set of one ID dataset (whatever K and draw order; the pass collects an open set's
    own ID side where its samples differ); another ID dataset or a name that is no open set: its own pass."""
    keys = {n: openset.pass_key(n) for n in NAMES}
    assert len({keys[n] for n in NAMES if n.startswith("PACS")}) == 1
    assert len({keys[n] for n in NAMES if n.startswith("VLCS")}) == 1
    assert keys["PACS_DTD"] != keys["VLCS_DTD"]
    assert openset.pass_key("PACS") == ("PACS",) != keys["PACS_DTD"]


# ------------------------------------------------------------------------------ the split_fewshot cache, both ways
class UpstreamDatum:
    """The official ``Datum`` (CoOp/dassl/data/datasets/base_dataset.py of LinLLLL/CRoFT): six attributes, no
    pickling hooks, so a pickle of it is exactly what the official classes write and read."""

    def __init__(self, impath="", label=0, domain=0, classname="", domainname="", alldomain=None):
        self._impath, self._label, self._domain = impath, label, domain
        self._classname, self._domainname, self._alldomain = classname, domainname, alldomain

    domainname = property(lambda self: self._domainname)


UpstreamDatum.__name__ = UpstreamDatum.__qualname__ = "Datum"
UpstreamDatum.__module__ = "dassl.data.datasets.base_dataset"


@contextlib.contextmanager
def official_datum_module():
    """Within the block, ``dassl.data.datasets.base_dataset`` is a module holding the official Datum only, so
    pickle writes and reads Datum objects exactly as the official code does."""
    real = sys.modules["dassl.data.datasets.base_dataset"]
    mod = types.ModuleType(real.__name__)
    mod.Datum = UpstreamDatum
    sys.modules[real.__name__] = mod
    try:
        yield
    finally:
        sys.modules[real.__name__] = real


def cache_file(root: str, folder: str = "dtd", shots: int = K, seed: int = 1) -> str:
    return os.path.join(root, folder, "split_fewshot", f"shot_{shots}-seed_{seed}.pkl")


def test_written_cache_is_the_official_draw_in_the_official_layout(kroot):
    clear_caches(kroot)
    kbuild(kcfg(kroot, "PACS_DTD", seed=1))
    with official_datum_module(), open(cache_file(kroot), "rb") as f:
        data = pickle.load(f)
    want = expected_draws(kroot, "PACS_DTD", seed=1)["cache"]
    assert sorted(data) == ["train", "val"]
    for key in ("train", "val"):
        assert all(type(d) is UpstreamDatum for d in data[key])
        assert [(d._impath, d._label, d._classname) for d in data[key]] == [
            (p, lab, os.path.basename(os.path.dirname(p))) for p, lab, _ in want[key]]
        assert {(d._domain, d.domainname, d._alldomain) for d in data[key]} == {(0, "", None)}
    assert len(data["train"]) == 2 * K and len(data["val"]) == 2 * 4
    with official_datum_module(), open(cache_file(kroot), "rb") as f:  # byte for byte what the official code writes
        assert f.read() == pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)


@pytest.mark.parametrize("order", ["official", "id_first"])
def test_cache_is_reused_and_changes_the_id_splits_only_officially(kroot, order):
    """A cache the official / CoOp classes wrote is read as it is. Whether it existed changes the ID samples in
    the official order (a draw less before the caps: 12 of 18 source and exactly 12 held-out images per class
    are sampled here), never with ``id_first``."""
    clear_caches(kroot)
    img = os.path.join(kroot, "dtd", "images")
    chosen = {"train": [UpstreamDatum(os.path.join(img, "banded", f"banded_{i:04d}.png"), 0, 0, "banded")
                        for i in (3, 5)],
              "val": [UpstreamDatum(os.path.join(img, "blotchy", "blotchy_0061.png"), 1, 0, "blotchy")]}
    os.makedirs(os.path.dirname(cache_file(kroot)))
    with official_datum_module(), open(cache_file(kroot), "wb") as f:
        pickle.dump(chosen, f, protocol=pickle.HIGHEST_PROTOCOL)  # as the official / CoOp classes write it
    stamp = os.path.getmtime(cache_file(kroot))
    loaded = kbuild(ocfg(kroot, "VLCS_DTD", order, ood_cap=0, id_cap=12))
    assert loaded.data_report()["open_set"]["fewshot_cache"] == {"path": cache_file(kroot), "state": "loaded"}
    _, oodl = entries(kroot, "VLCS_DTD")
    assert paths(loaded.ood_test) == [d._impath for d in chosen["train"] + chosen["val"]] + paths(oodl["test"])
    assert os.path.getmtime(cache_file(kroot)) == stamp
    clear_caches(kroot)
    drawn = kbuild(ocfg(kroot, "VLCS_DTD", order, ood_cap=0, id_cap=12))
    assert drawn.data_report()["open_set"]["fewshot_cache"]["state"] == "written"
    assert paths(loaded.train_x) == paths(drawn.train_x)
    for split in ("val", "test"):
        assert (paths(getattr(loaded, split)) == paths(getattr(drawn, split))) is (order == "id_first"), split
    again = kbuild(ocfg(kroot, "PACS_DTD", order, ood_cap=0))  # another dataset class sharing the folder reads it
    assert again.data_report()["open_set"]["fewshot_cache"]["state"] == "loaded"
    assert paths(again.ood_test) == paths(drawn.ood_test)


def test_cache_that_cannot_be_written_is_a_note(kroot, capsys):
    clear_caches(kroot)
    with open(os.path.join(kroot, "dtd", "split_fewshot"), "w") as f:  # a file where the folder belongs
        f.write("")
    try:
        ds = kbuild(kcfg(kroot, "VLCS_DTD", seed=2))
        assert ds.data_report()["open_set"]["fewshot_cache"]["state"] == "drawn"
        assert "Note: cannot write the few-shot cache" in capsys.readouterr().out
        assert paths(ds.ood_test) == paths(expected_draws(kroot, "VLCS_DTD", seed=2)["ood_test"])
    finally:
        os.remove(os.path.join(kroot, "dtd", "split_fewshot"))


def test_cache_holding_excluded_classes_is_used_with_a_warning(tmp_path, capsys):
    """A Caltech101 cache written by another class (e.g. CoOp's Caltech101: every class) is used as it is."""
    r = str(tmp_path)
    write_lodo_tree(r, "PACS", classes=("dog", "horse"), per_class=3)
    base = write_coop_tree(r, "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                           ["ketch", "dalmatian"], counts=(2, 1, 1))
    items = [Datum(impath=os.path.join(base, "101_ObjectCategories", c, f"{c}_0000.png"), label=i, classname=c)
             for i, c in enumerate(("ketch", "dalmatian"))]
    os.makedirs(os.path.join(base, "split_fewshot"))
    with open(cache_file(r, "caltech-101", shots=1), "wb") as f:
        pickle.dump({"train": items, "val": []}, f)
    cfg = make_cfg(r, "PACS_Caltech101", shots=1, env="photo")
    cfg.SEED = 1
    ds = build(cfg)
    assert Counter(d.classname for d in ds.ood_test) == {"ketch": 2, "dalmatian": 1}  # + ketch's test image
    assert any("dalmatian" in w for w in ds.data_report()["warnings"])
    assert "WARNING: PACS_Caltech101: the few-shot cache" in capsys.readouterr().out


def test_cache_files_are_data(tmp_path):
    """Only Datum objects are built: another global is refused, nothing runs."""
    from dassl.utils.safe_load import UnsafeFileError

    r = str(tmp_path)
    write_lodo_tree(r, "PACS", classes=("dog",), per_class=3)
    write_coop_tree(r, "dtd", "images", "split_zhou_DescribableTextures.json", ["banded"], counts=(2, 1, 1))
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    path = cache_file(r, shots=1)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        pickle.dump({"train": [Payload()], "val": []}, f)
    cfg = make_cfg(r, "PACS_DTD", shots=1, env="photo")
    cfg.SEED = 1
    with pytest.raises(UnsafeFileError, match=r"refusing to unpickle the few-shot cache .*shot_1-seed_1\.pkl.*"
                                              r"(posix|os)\.makedirs.*nothing in it ran; delete it"):
        build(cfg)
    assert not marker.exists()
    with open(path, "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DataError, match=r"cannot read the few-shot cache .*delete it"):
        build(cfg)
    with open(path, "wb") as f:
        pickle.dump({"train": [Datum(impath="/nowhere/banded_0000.png", label=0, classname="banded")], "val": []},
                    f)
    with pytest.raises(DataError, match=r"few-shot cache .*image not found: /nowhere.*delete it"):
        build(cfg)


# -------------------------------------------------- the vendored Dassl helpers against the official base_dataset.py
# Expected draws come from the helpers above (``plain``, ``balance``), written from the official
# generate_fewshot_dataset / generate_fewshot_dataset_balance with random.Random; the random state after the call
# is compared too (a helper that draws where the official one does not would shift every later draw).
def _tuples(items):
    return [(d.impath, d.label, d.domainname) for d in items]


def _items(spec):
    """Datum objects from ``[(label, domain, count), ...]`` in that order."""
    return [Datum(impath=f"/d/{dom}/{lab}/{i}.png", label=lab, domain=j, classname=f"c{lab}", domainname=dom)
            for lab, dom, n in spec for j, i in [(("a", "b", "c").index(dom), i) for i in range(n)]]


def _after(seed, fn):
    random.seed(seed)
    out = fn()
    return out, random.random()


def test_balance_sampler_takes_a_small_domain_whole_without_drawing():
    """16 shots over 3 domains: 5 per domain; domain ``c`` has 3 images in all, so the official code takes them
    as they are (no draw); label 2 has fewer than 16 images and is taken whole."""
    items = _items([(0, "a", 9), (0, "b", 8), (0, "c", 2), (1, "a", 7), (1, "b", 9), (1, "c", 1), (2, "a", 4)])
    base = DatasetBase(train_x=items)
    got, nxt = _after(5, lambda: base.generate_fewshot_dataset_balance(items, num_shots=16))
    rng = random.Random(5)
    want = balance(rng, [(d.impath, d.label, d.domainname) for d in items], 16)
    assert [t[:2] for t in _tuples(got)] == [t[:2] for t in want]
    assert nxt == rng.random()
    assert sum(1 for d in got if d.domainname == "c") == 2 * 3  # labels 0 and 1: all of domain c, in order
    # repeat=True (official argument): short domains and labels are filled with random.choices instead
    got, nxt = _after(5, lambda: base.generate_fewshot_dataset_balance(items, num_shots=16, repeat=True))
    rng, want = random.Random(5), []
    domains = {dom: [d for d in items if d.domainname == dom] for dom in ("a", "b", "c")}
    for lab in (0, 1, 2):
        group = [d for d in items if d.label == lab]
        if len(group) < 16:
            want += rng.choices(group, k=16)
            continue
        for dom in domains.values():
            want += rng.sample(dom, 5) if len(dom) >= 5 else rng.choices(dom, k=5)
    assert _tuples(got) == _tuples(want) and nxt == rng.random()


def test_caps_draw_at_exactly_the_cap():
    """``subsample_per_class`` is the official ``generate_fewshot_dataset(items, num_shots=cap)``: a class with
    exactly ``cap`` images is sampled too (reordered, random state consumed), a smaller one kept as it is."""
    from dassl.data.datasets.base_dataset import subsample_per_class

    items = _items([(0, "a", 4), (1, "a", 6), (2, "b", 3), (3, "c", 4)])
    got, nxt = _after(11, lambda: subsample_per_class(items, 4))
    rng = random.Random(11)
    want = plain(rng, [(d.impath, d.label, d.domainname) for d in items], 4)
    assert [t[:2] for t in _tuples(got)] == [t[:2] for t in want] and nxt == rng.random()
    assert [d.impath for d in got if d.label == 0] != [d.impath for d in items if d.label == 0]  # reordered
    assert [d.impath for d in got if d.label == 2] == [d.impath for d in items if d.label == 2]  # kept
    base = DatasetBase(train_x=items)
    same, nxt2 = _after(11, lambda: base.generate_fewshot_dataset(items, num_shots=4))
    assert _tuples(same) == _tuples(got) and nxt2 == nxt


def test_datum_pickles_load_in_the_official_code_and_back():
    """The official ``Datum`` (``UpstreamDatum`` above) reads the project's pickles with ``domainname`` set even
    when empty (the official DataManager reads it of every item), and its pickles read back here."""
    ours = [Datum("/d/a.png", 3, 1, "banded", "sketch"), Datum("/d/b.png", 0, 0, "dog")]
    data = pickle.dumps({"train": ours, "val": []}, protocol=pickle.HIGHEST_PROTOCOL)
    with official_datum_module():
        theirs = pickle.loads(data)["train"]
        assert all(type(d) is UpstreamDatum for d in theirs)
        assert [vars(d) for d in theirs] == [
            {"_impath": "/d/a.png", "_label": 3, "_domain": 1, "_classname": "banded", "_domainname": "sketch",
             "_alldomain": None},
            {"_impath": "/d/b.png", "_label": 0, "_domain": 0, "_classname": "dog", "_domainname": "",
             "_alldomain": None}]
        assert [d.domainname for d in theirs] == ["sketch", ""]
        theirs[0]._alldomain = ["art_painting", "cartoon", "photo", "sketch"]
        back = pickle.dumps(theirs, protocol=pickle.HIGHEST_PROTOCOL)
    again = pickle.loads(back)
    assert all(type(d) is Datum for d in again)
    assert [(d.impath, d.label, d.domain, d.classname, d.domainname) for d in again] == [
        ("/d/a.png", 3, 1, "banded", "sketch"), ("/d/b.png", 0, 0, "dog", "")]
    assert again[0].alldomain == ["art_painting", "cartoon", "photo", "sketch"] and again[1].alldomain is None


# --------------------------------------------------------------------- the drivers' DPLCLIP / Bayes-CAL evaluation
DRIVER_TINY = ["--", "MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE",
               "(32, 32)", "DATALOADER.NUM_WORKERS", "0", "DEVICE", "cpu"]


def _driver_argv(data: str, base) -> list[str]:
    return ["--root", data, "--datasets", "PACS", "--domains", "sketch", "--cfgs", "rn50_ep30", "--seeds", "1",
            "--epochs", "1", "--launcher", "inprocess", "--output-root", str(base / "out"), "--eval-root",
            str(base / "eval"), "--ood", "DTD", "Food101", "Caltech101", *DRIVER_TINY]


@pytest.mark.parametrize("trainer", ["DPLCLIP", "BCAL"])
def test_planned_setup2_evaluation_passes_k_in_one_pass(trainer, tmp_path):
    """The official plan's evaluation runs carry DATASET.NUM_SHOTS 16, and the three open sets of a model share
    one pass although PACS_DTD's K-shot val (and, in the official order, every open set's ID samples) differs."""
    from launch import setup2

    cwd = os.getcwd()
    try:
        jobs = setup2.plan(_driver_argv("/nonexistent", tmp_path), trainer=trainer, evaluate=True)[1]
    finally:
        os.chdir(cwd)
    runs = sorted(sorted(os.path.basename(r["output_dir"].split("/test_on_")[0]) for r in j.runs()) for j in jobs)
    assert runs == [["PACS_Caltech101_rn50_ep30", "PACS_DTD_rn50_ep30", "PACS_Food101_rn50_ep30"]]
    for j in jobs:
        assert j.argv[j.argv.index("DATASET.NUM_SHOTS") + 1] == "16"


@pytest.mark.slow
def test_planned_dplclip_evaluation_runs_get_the_k_draw(tmp_path):
    """End to end on the synthetic tree: the driver trains DPLCLIP, then its planned evaluation runs build the
    open sets with the K = 16 draw (DTD-like 60/24/36: 56 per class) and write CoOp's caches."""
    from launch import setup2
    from synthetic_openset import write_caltech101_like, write_dtd_counts_like, write_food101_like

    data = str(tmp_path / "data")
    write_lodo_tree(data, "PACS", classes=KSHOT_CLASSES, per_class=8, size=16)
    write_dtd_counts_like(data)
    write_food101_like(data, counts=(20, 6, 3))
    write_caltech101_like(data)
    argv = _driver_argv(data, tmp_path)
    cwd = os.getcwd()
    try:
        assert setup2.main(argv, trainer="DPLCLIP") == 0
        assert setup2.main(argv, trainer="DPLCLIP", evaluate=True) == 0
    finally:
        os.chdir(cwd)
    per_class = {"DTD": 56, "Food101": 23}  # 16 + 4 + 36; 16 + 4 + 3
    seen = set()
    for dirpath, _, files in os.walk(tmp_path / "eval"):
        if "record.json" not in files:
            continue
        with open(os.path.join(dirpath, "record.json")) as f:
            rec = json.load(f)
        ood = rec["config"]["DATASET"]["NAME"].split("_")[1]
        seen.add(ood)
        assert rec["config"]["DATASET"]["NUM_SHOTS"] == 16 and rec["protocol"]["dataset"]["open_set"][
            "num_shots"] == 16
        assert len(rec["shared_pass"]["runs"]) == 3  # one pass; PACS_DTD's own K-cut val is its own ID side
        cache = rec["data"]["open_set"]["fewshot_cache"]
        assert cache["state"] == "written" and os.path.isfile(cache["path"]) and "shot_16-seed_1.pkl" in cache["path"]
        n_ood = len(np.load(os.path.join(dirpath, "scores.npz"))["ood_test__score_energy"])
        if ood in per_class:
            n_classes = len(DTD_CLASSES[:2]) if ood == "DTD" else len(FOOD101_CLASSES)
            assert n_ood == rec["data"]["open_set"]["ood_test"] == per_class[ood] * n_classes
    assert seen == {"DTD", "Food101", "Caltech101"}
