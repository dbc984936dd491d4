"""``CoOp/tools/build_lodo_splits.py``: raw PACS/VLCS download -> ``test_on_<domain>.json`` + image links."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest

from dassl.config import get_cfg_default
from dassl.data import DataManager
from dassl.utils.errors import ConfigError, DataError
from synthetic import draw_sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "CoOp", "tools", "build_lodo_splits.py")
_spec = importlib.util.spec_from_file_location("build_lodo_splits", TOOL)
bls = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bls)

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
# raw class folder -> images per domain (different sizes to exercise the rounding; "Giraffe" tests lower-casing)
PACS_CLASSES = {"dog": 5, "elephant": 7, "Giraffe": 1}
VLCS_DOMAINBED = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
VLCS_UPPER = ("CALTECH", "LABELME", "PASCAL", "SUN")
VLCS_CLASSES = {"bird": 4, "car": 3, "chair": 6}


def write_raw(root: str, domains=PACS_DOMAINS, classes=PACS_CLASSES, junk: bool = True) -> str:
    """Fake raw download ``<root>/<domain>/<class>/<image>`` (+ junk files that must be ignored)."""
    os.makedirs(root, exist_ok=True)
    for di, dom in enumerate(domains):
        for ci, (cls, n) in enumerate(classes.items()):
            d = os.path.join(root, dom, cls)
            os.makedirs(d, exist_ok=True)
            for i in range(n + di % 2):  # domains differ in size
                ext = ".jpg" if i % 2 else ".png"
                draw_sample(ci, di, i, 16).save(os.path.join(d, f"img{i:03d}{ext}"))
            if junk:
                open(os.path.join(d, ".DS_Store"), "wb").close()
                with open(os.path.join(d, "notes.txt"), "w") as f:
                    f.write("not an image")
    if junk:
        os.makedirs(os.path.join(root, "__MACOSX"), exist_ok=True)
        with open(os.path.join(root, "README.md"), "w") as f:
            f.write("raw")
    return root


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def quiet(_msg: str) -> None:
    pass


@pytest.fixture
def pacs(tmp_path):
    raw = write_raw(str(tmp_path / "raw" / "PACS"))
    root = str(tmp_path / "DATA")
    man = bls.build_splits("PACS", raw, root, log=quiet)
    return raw, root, man


def test_pacs_layout_and_content(pacs):
    raw, root, man = pacs
    base = os.path.join(root, "PACS")
    assert sorted(f for f in os.listdir(base) if f.endswith(".json")) == sorted(
        [f"test_on_{d}.json" for d in PACS_DOMAINS] + ["splits_manifest.json"])
    assert man["classnames"] == ["dog", "elephant", "giraffe"] and man["val_fraction"] == 0.2
    n_per_domain = {d: sum(n + i % 2 for n in PACS_CLASSES.values()) for i, d in enumerate(PACS_DOMAINS)}
    for held in PACS_DOMAINS:
        sp = load(os.path.join(base, f"test_on_{held}.json"))
        assert list(sp) == ["train", "val", "test"]
        for key in sp:
            for rel, label, cname in sp[key]:
                assert os.path.isfile(os.path.join(base, "images", rel))
                assert os.path.islink(os.path.join(base, "images", rel))
                assert label == ["dog", "elephant", "giraffe"].index(cname)
                assert rel.split("/")[1].lower() == cname
            assert [e[0] for e in sp[key]] == sorted(e[0] for e in sp[key])
        assert {e[0].split("/")[0] for e in sp["test"]} == {held}
        assert len(sp["test"]) == n_per_domain[held]
        src = {e[0].split("/")[0] for e in sp["train"] + sp["val"]}
        assert src == set(PACS_DOMAINS) - {held}
        assert not {e[0] for e in sp["train"]} & {e[0] for e in sp["val"]}
        assert len(sp["train"]) + len(sp["val"]) == sum(n_per_domain.values()) - n_per_domain[held]
        assert man["splits"][f"test_on_{held}.json"]["sha256"] == hashlib.sha256(
            read_bytes(os.path.join(base, f"test_on_{held}.json"))).hexdigest()
    # an image of a source domain is in the same split in every file
    a, b = (load(os.path.join(base, f"test_on_{d}.json")) for d in ("photo", "sketch"))
    in_a = {e[0] for e in a["val"] if e[0].startswith("art_painting/")}
    in_b = {e[0] for e in b["val"] if e[0].startswith("art_painting/")}
    assert in_a == in_b


@pytest.mark.parametrize("frac", [0.2, 0.5, 0.0])
def test_ratio(tmp_path, frac):
    raw = write_raw(str(tmp_path / "raw"), junk=False)
    root = str(tmp_path / f"D{frac}")
    bls.build_splits("PACS", raw, root, val_fraction=frac, log=quiet)
    sp = load(os.path.join(root, "PACS", "test_on_sketch.json"))
    for i, dom in enumerate(PACS_DOMAINS[:3]):
        for cls, n in PACS_CLASSES.items():
            n = n + i % 2
            n_val = sum(1 for e in sp["val"] if e[0].startswith(f"{dom}/{cls}/"))
            expected = 0 if (n < 2 or frac == 0) else min(max(round(frac * n), 1), n - 1)
            assert n_val == expected == bls.num_val(n, frac)
    assert bls.num_val(10, 0.2) == 2 and bls.num_val(1, 0.2) == 0 and bls.num_val(2, 0.9) == 1


def test_deterministic_and_listing_order_independent(tmp_path, monkeypatch):
    raw = write_raw(str(tmp_path / "raw"))
    bls.build_splits("PACS", raw, str(tmp_path / "A"), log=quiet)
    real_listdir = os.listdir
    monkeypatch.setattr(bls.os, "listdir", lambda p: list(reversed(real_listdir(p))))
    random.seed(12345)  # the global generator must not matter
    bls.build_splits("PACS", raw, str(tmp_path / "B"), log=quiet)
    monkeypatch.undo()
    for d in PACS_DOMAINS:
        f = f"test_on_{d}.json"
        assert read_bytes(str(tmp_path / "A" / "PACS" / f)) == read_bytes(str(tmp_path / "B" / "PACS" / f))
    bls.build_splits("PACS", raw, str(tmp_path / "C"), seed=1, log=quiet)
    assert any(read_bytes(str(tmp_path / "A" / "PACS" / f"test_on_{d}.json"))
               != read_bytes(str(tmp_path / "C" / "PACS" / f"test_on_{d}.json")) for d in PACS_DOMAINS)


def test_refuses_to_clobber(pacs):
    raw, root, _ = pacs
    path = os.path.join(root, "PACS", "test_on_photo.json")
    before = read_bytes(path)
    msgs: list[str] = []
    bls.build_splits("PACS", raw, root, log=msgs.append)  # identical rerun: fine, nothing rewritten
    assert any("unchanged" in m for m in msgs) and read_bytes(path) == before
    with pytest.raises(DataError, match=r"refusing to overwrite .*test_on_.*--force"):
        bls.build_splits("PACS", raw, root, seed=7, log=quiet)
    assert read_bytes(path) == before
    bls.build_splits("PACS", raw, root, seed=7, force=True, log=quiet)
    assert load(os.path.join(root, "PACS", "splits_manifest.json"))["seed"] == 7
    # a foreign file where an image link should go
    victim = os.path.join(root, "PACS", "images", "photo", "dog", "img000.png")
    os.unlink(victim)
    with open(victim, "w") as f:
        f.write("x")
    with pytest.raises(DataError, match=r"refusing to overwrite .*img000\.png"):
        bls.build_splits("PACS", raw, root, seed=7, log=quiet)
    bls.build_splits("PACS", raw, root, seed=7, force=True, log=quiet)
    assert os.path.islink(victim)


def test_copy_and_none_modes(tmp_path):
    raw = write_raw(str(tmp_path / "raw"))
    root = str(tmp_path / "D")
    bls.build_splits("PACS", raw, root, link="copy", log=quiet)
    img = os.path.join(root, "PACS", "images", "cartoon", "elephant", "img000.png")
    assert os.path.isfile(img) and not os.path.islink(img)
    # none: --raw must be the images folder itself
    with pytest.raises(ConfigError, match="--link none needs --raw to be the images folder"):
        bls.build_splits("PACS", raw, str(tmp_path / "E"), link="none", log=quiet)
    images = os.path.join(root, "PACS", "images")
    os.makedirs(str(tmp_path / "F" / "PACS"))
    os.rename(images, str(tmp_path / "F" / "PACS" / "images"))
    man = bls.build_splits("PACS", str(tmp_path / "F" / "PACS" / "images"), str(tmp_path / "F"), link="none",
                           log=quiet)
    assert man["link"] == "none"
    sp = load(str(tmp_path / "F" / "PACS" / "test_on_art_painting.json"))
    assert all(os.path.isfile(str(tmp_path / "F" / "PACS" / "images" / e[0])) for e in sp["train"])


def test_wrong_layout_errors(tmp_path):
    with pytest.raises(DataError, match="raw download folder not found"):
        bls.build_splits("PACS", str(tmp_path / "nope"), str(tmp_path / "D"), log=quiet)
    # pointing one level too high: hint at the right folder
    write_raw(str(tmp_path / "dl" / "PACS"), junk=False)
    with pytest.raises(DataError, match=r"no folder for domain\(s\) art_painting.*did you mean --raw .*PACS"):
        bls.build_splits("PACS", str(tmp_path / "dl"), str(tmp_path / "D"), log=quiet)
    # a missing domain
    partial = write_raw(str(tmp_path / "partial"), domains=PACS_DOMAINS[:3], junk=False)
    with pytest.raises(DataError, match=r"no folder for domain\(s\) sketch"):
        bls.build_splits("PACS", partial, str(tmp_path / "D"), log=quiet)
    # images directly in a domain folder (no class level)
    flat = str(tmp_path / "flat")
    for i, d in enumerate(PACS_DOMAINS):
        os.makedirs(os.path.join(flat, d))
        draw_sample(0, i, 0, 8).save(os.path.join(flat, d, "x.png"))
    with pytest.raises(DataError, match=r"images directly in .*art_painting"):
        bls.build_splits("PACS", flat, str(tmp_path / "D"), log=quiet)
    with pytest.raises(ConfigError, match="val-fraction"):
        bls.build_splits("PACS", partial, str(tmp_path / "D"), val_fraction=1.0, log=quiet)
    with pytest.raises(ConfigError, match="unknown --dataset"):
        bls.build_splits("OfficeHome", partial, str(tmp_path / "D"), log=quiet)
    assert not os.path.exists(str(tmp_path / "D" / "PACS" / "test_on_sketch.json"))


def make_cfg(root: str, name: str, env: str, shots: int = 2):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT = root
    cfg.DATASET.NAME = name
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.DOMAIN_MATCH = "folder"  # named fix: upper-case VLCS folders keep their four domains
    cfg.TEST_ENV = env
    cfg.INPUT.SIZE = (32, 32)
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 4
    cfg.DATALOADER.TEST.BATCH_SIZE = 4
    cfg.VERBOSE = False
    return cfg


def test_loads_through_pacs_and_datamanager(pacs):
    from datasets.lodo import PACS

    _, root, _ = pacs
    random.seed(0)
    cfg = make_cfg(root, "PACS", "cartoon")
    ds = PACS(cfg)
    assert ds.num_classes == 3 and ds.classnames == ["dog", "elephant", "giraffe"]
    assert {d.domainname for d in ds.test} == {"cartoon"}
    assert {d.domainname for d in ds.train_x} <= {"art_painting", "photo", "sketch"}
    dm = DataManager(cfg, dataset=ds)
    batch = next(iter(dm.train_loader_x))
    assert tuple(batch["img"].shape[1:]) == (3, 32, 32)
    batch = next(iter(dm.test_loader))
    assert tuple(batch["img"].shape) == (4, 3, 32, 32)


VLCS_LOWER = ("caltech101", "labelme", "sun09", "voc2007")


@pytest.mark.parametrize("raw_domains", [VLCS_DOMAINBED, VLCS_UPPER, VLCS_LOWER])
def test_vlcs_domain_folders(tmp_path, raw_domains):
    """Any raw spelling (DomainBed / OoD-Bench, lower-case, the README's) gives the README's layout
    VLCS/images/{CALTECH,LABELME,PASCAL,SUN}; the folder rule keeps four domains."""
    from datasets.lodo import VLCS

    raw = write_raw(str(tmp_path / "raw"), domains=raw_domains, classes=VLCS_CLASSES)
    root = str(tmp_path / "D")
    man = bls.build_splits("VLCS", raw, root, log=quiet)
    order = ["caltech", "labelme", "pascal", "sun"] if raw_domains == VLCS_UPPER else ["caltech", "labelme", "sun",
                                                                                       "pascal"]
    assert man["raw_domain_folders"] == dict(zip(order, raw_domains))
    assert man["domain_folders"] == {"caltech": "CALTECH", "labelme": "LABELME", "pascal": "PASCAL", "sun": "SUN"}
    assert sorted(os.listdir(os.path.join(root, "VLCS", "images"))) == list(VLCS_UPPER)
    random.seed(0)
    ds = VLCS(make_cfg(root, "VLCS", "pascal"))
    assert ds.classnames == ["bird", "car", "chair"]
    assert {d.domainname for d in ds.test} == {"pascal"}
    assert {d.domainname for d in ds.val} == {"caltech", "labelme", "sun"}
    dm = DataManager(make_cfg(root, "VLCS", "pascal"), dataset=ds)
    assert tuple(next(iter(dm.val_loader))["img"].shape[1:]) == (3, 32, 32)
    if raw_domains == VLCS_DOMAINBED:
        # --link none cannot rename DomainBed's folders
        with pytest.raises(DataError, match=r"--link none: domain folder\(s\) Caltech101"):
            bls.build_splits("VLCS", raw, _none_root(tmp_path, raw), link="none", log=quiet)


def test_vlcs_substring_rule_counts_and_warning(tmp_path, capsys):
    """The official substring rule on the README layout: every image is domain ``sun`` (case-sensitive tests);
    the run's log shows the counts and warns that the rule and the folders disagree; the record carries both."""
    from datasets.lodo import VLCS

    raw = write_raw(str(tmp_path / "raw"), domains=VLCS_DOMAINBED, classes=VLCS_CLASSES, junk=False)
    root = str(tmp_path / "D")
    bls.build_splits("VLCS", raw, root, log=quiet)
    split = load(os.path.join(root, "VLCS", "test_on_pascal.json"))
    cfg = make_cfg(root, "VLCS", "pascal")
    cfg.DATASET.DOMAIN_MATCH = "substring"
    capsys.readouterr()
    rep = VLCS(cfg).data_report()
    log = capsys.readouterr().out
    sizes = {k: len(split[k]) for k in ("train", "val", "test")}
    assert rep["domain_counts"] == {k: {"sun": n} for k, n in sizes.items()}
    per_folder = {k: {} for k in sizes}
    for k in sizes:
        for rel, _, _ in split[k]:
            per_folder[k][rel.split("/")[0]] = per_folder[k].get(rel.split("/")[0], 0) + 1
    assert rep["folder_counts"] == per_folder
    assert f"VLCS domains (DATASET.DOMAIN_MATCH substring) in test_on_pascal.json: train sun {sizes['train']}" in log
    moved = sum(sizes.values()) - sum(n for k in sizes for f, n in per_folder[k].items() if f == "SUN")
    assert len(rep["warnings"]) == 1 and f"assigns {moved} of {sum(sizes.values())} images" in rep["warnings"][0]
    assert "CALTECH -> sun" in rep["warnings"][0] and "LABELME -> sun" in rep["warnings"][0]
    assert f"WARNING: VLCS: {rep['warnings'][0]}" in log
    cfg.DATASET.DOMAIN_MATCH = "folder"
    rep = VLCS(cfg).data_report()
    assert rep["warnings"] == [] and rep["domain_counts"]["test"] == {"pascal": sizes["test"]}


def test_missing_class_warns_in_builder_and_run(tmp_path, capsys):
    """A class absent from one domain of the raw download: a WARNING from the builder and in every run's log
    and record."""
    from datasets.lodo import PACS

    raw = write_raw(str(tmp_path / "raw"), junk=False)
    import shutil

    shutil.rmtree(os.path.join(raw, "cartoon", "elephant"))
    root = str(tmp_path / "D")
    lines = []
    bls.build_splits("PACS", raw, root, log=lines.append)
    assert [ln for ln in lines if ln.startswith("WARNING: domain cartoon has no images of class(es) elephant")]
    capsys.readouterr()
    rep = PACS(make_cfg(root, "PACS", "sketch")).data_report()
    want = "domain folder cartoon has no images of class(es) elephant in test_on_sketch.json"
    assert rep["warnings"] == [want]
    assert f"WARNING: PACS: {want}" in capsys.readouterr().out


def _none_root(tmp_path, raw: str) -> str:
    """A root whose VLCS/images is ``raw`` (via a symlinked folder) for --link none."""
    root = str(tmp_path / "N")
    os.makedirs(os.path.join(root, "VLCS"), exist_ok=True)
    link = os.path.join(root, "VLCS", "images")
    if not os.path.lexists(link):
        os.symlink(raw, link)
    return root


def test_cli(tmp_path, capsys):
    raw = write_raw(str(tmp_path / "raw"), junk=False)
    assert bls.main(["--dataset", "PACS", "--raw", raw, "--root", str(tmp_path / "D")]) == 0
    out = capsys.readouterr().out
    assert "val_fraction=0.2 (80/20" in out and "test_on_sketch.json" in out
    assert bls.main(["--dataset", "PACS", "--raw", str(tmp_path / "missing"), "--root", str(tmp_path / "D")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: raw download folder not found") and "\n" not in err


def test_cli_subprocess_from_coop(tmp_path):
    raw = write_raw(str(tmp_path / "raw"), junk=False)
    proc = subprocess.run([sys.executable, "tools/build_lodo_splits.py", "--dataset", "PACS", "--raw", raw,
                           "--root", str(tmp_path / "D"), "--val-fraction", "0.5", "--link", "copy"],
                          cwd=os.path.join(REPO, "CoOp"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "val_fraction=0.5" in proc.stdout
    assert load(str(tmp_path / "D" / "PACS" / "splits_manifest.json"))["val_fraction"] == 0.5
