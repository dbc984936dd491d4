"""Real-input failures a new user meets (issue 21): each is one ``error:`` line (exit 2), nothing marked done, or a
warning in the log and the record; plus provenance (weights path and sha256) and the ROC figure's ID side.

Runs are forked children of this interpreter (:mod:`procs`) or in-process ``train.main`` calls on the tiny CLIP.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch

from helpers import COOP, TINY, run_cli
from procs import run_train_forked
from synthetic import draw_sample, write_lodo_tree
from synthetic_openset import write_all_openset

PACS_CFG = "configs/datasets/PACS.yaml"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(COOP, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def _warm():
    import train  # noqa: F401  (imported once; forked children inherit it)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("data"))
    write_lodo_tree(r, per_class=2)
    write_all_openset(r)
    return r


def args(root: str, out: str, trainer: str = "CLIP_Adapter", dataset_cfg: str = PACS_CFG, flags=(), extra=(),
         config: str = "") -> list[str]:
    return ["--root", root, "--seed", "1", "--trainer", trainer, "--dataset-config-file", dataset_cfg,
            "--config-file", config or f"configs/trainers/{trainer}/rn50_ep30.yaml", "--output-dir", out, *flags,
            *TINY, "VERBOSE", "False", "TEST_ENV", "sketch", "OPTIM.MAX_EPOCH", "1", *extra]


def refused(res, out: str, needle: str) -> str:
    """Exit 2, exactly one stderr line (no traceback) containing ``needle``, no record / done."""
    lines = res.error_lines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert needle in lines[0], lines[0]
    assert not os.path.exists(os.path.join(out, "done")) and not os.path.exists(os.path.join(out, "record.json"))
    return lines[0]


# ------------------------------------------------------------------ config files
BAD_YAML = """DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 32
   TEST:
    BATCH_SIZE: 100
"""  # line 4: "TEST" indented by 3, a level that does not exist


def test_yaml_indentation_error_names_file_and_line(root, tmp_path):
    import yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML, encoding="utf-8")
    with pytest.raises(yaml.YAMLError) as err:  # PyYAML's own report: line 4, column 4
        yaml.safe_load(BAD_YAML)
    assert (err.value.problem_mark.line + 1, err.value.problem_mark.column + 1) == (4, 4)
    out = str(tmp_path / "o")
    line = refused(run_train_forked(args(root, out, config=str(bad)), str(tmp_path)), out,
                   f"trainer config {bad}: YAML syntax error at line 4, column 4")
    assert "<unicode string>" not in line
    assert not os.path.exists(out)


def test_python_config_is_not_executed(root, tmp_path):
    marker = tmp_path / "ran"
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"open({str(marker)!r}, 'w')\nfrom yacs.config import CfgNode\ncfg = CfgNode()\n")
    out = str(tmp_path / "o")
    refused(run_train_forked(args(root, out, config=str(cfg)), str(tmp_path)), out, "config files are YAML")
    assert not marker.exists()


# ------------------------------------------------------------------ CLIP weights
def _meta_state_dict(arch: str) -> dict:
    """An open_clip architecture's state dict layout as meta tensors (shapes only: built in no time, a few kB on
    disk)."""
    import open_clip
    from open_clip.model import CLIP

    with torch.device("meta"):
        return CLIP(**open_clip.get_model_config(arch), quick_gelu=True).state_dict()


def _vit_b32_weights(path: str) -> None:
    torch.save(_meta_state_dict("ViT-B-32"), path)


def test_weights_of_another_architecture_name_both(root, tmp_path):
    weights = str(tmp_path / "ViT-B-32.pt")
    _vit_b32_weights(weights)
    out = str(tmp_path / "o")
    res = run_train_forked(args(root, out, extra=["MODEL.BACKBONE.NAME", "RN50", "MODEL.BACKBONE.WEIGHTS", weights]),
                           str(tmp_path))
    refused(res, out, f"CLIP weights {weights} does not match backbone RN50 (MODEL.BACKBONE.NAME): the "
            f"file holds ViT-B/32 weights")
    assert "No pretrained weights loaded" not in res.stdout + res.stderr


def test_open_clip_random_init_warning_is_not_shown(tmp_path, caplog):
    """open_clip logs "No pretrained weights loaded ... initialized randomly" whenever it builds an architecture;
    load_clip builds one and loads the weights right after, so the warning is dropped (and only there)."""
    import open_clip

    from clip_backbone import load_clip
    from dassl.utils.errors import WeightsError

    sd = _meta_state_dict("RN50")
    sd.pop("text_projection")  # RN50 weights with one tensor missing: RN50 is built, then they are refused
    weights = str(tmp_path / "w.pt")
    torch.save(sd, weights)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with pytest.raises(WeightsError, match=r"holds RN50 weights \(missing \['text_projection'\]\)"):
            load_clip("RN50", weights)
        assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
        open_clip.create_model("RN50", pretrained=None)  # the warning itself still exists
        assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_weights_provenance_in_log_and_record_default_path(root, tmp_path, monkeypatch):
    """``MODEL.BACKBONE.WEIGHTS ""``: the default ``~/.cache/clip/<name>.pt`` is named with its sha256."""
    from clip_backbone import load_clip

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = str(tmp_path / "home" / ".cache" / "clip" / "tiny-rn-test.pt")
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(3)
    torch.save(load_clip("tiny-rn-test", "random").model.state_dict(), path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    out = str(tmp_path / "o")
    res = run_train_forked(args(root, out, extra=["MODEL.BACKBONE.WEIGHTS", ""]), str(tmp_path))
    assert res.returncode == 0, res.stderr
    rec = json.load(open(os.path.join(out, "record.json")))
    assert rec["weights"] == {"backbone": "tiny-rn-test", "path": path, "size": os.path.getsize(path),
                              "sha256": digest}
    assert f"CLIP weights: {path} (sha256 {digest})" in open(os.path.join(out, "log.txt")).read()
    from dassl.utils.filecache import read_cache  # kept for the next run: $CROFT_CACHE_DIR/sha256.json

    cached = read_cache(os.path.join(os.environ["CROFT_CACHE_DIR"], "sha256.json"))[os.path.realpath(path)]
    assert cached == {"version": [os.path.getsize(path), os.stat(path).st_mtime_ns], "sha256": digest}


def test_sha256_is_computed_once_per_file_version(tmp_path, monkeypatch):
    from dassl.utils import filecache

    monkeypatch.setattr(filecache, "_SHA_MEMO", {})
    f = tmp_path / "w.pt"
    f.write_bytes(b"weights v1")
    cache = str(tmp_path / "sha.json")
    assert filecache.cached_sha256(str(f), cache) == hashlib.sha256(b"weights v1").hexdigest()
    entries = filecache.read_cache(cache)
    entries[str(f)]["sha256"] = "from-the-cache"  # a later process reads the cache instead of hashing again
    filecache.update_cache(cache, entries)
    monkeypatch.setattr(filecache, "_SHA_MEMO", {})
    assert filecache.cached_sha256(str(f), cache) == "from-the-cache"
    f.write_bytes(b"weights v2, longer")  # another size: another version, hashed again
    monkeypatch.setattr(filecache, "_SHA_MEMO", {})
    assert filecache.cached_sha256(str(f), cache) == hashlib.sha256(b"weights v2, longer").hexdigest()


# ------------------------------------------------------------------ images checked before training
def _truncated_jpeg(path: str) -> None:
    buf = io.BytesIO()
    draw_sample(0, 0, 0, 64).save(buf, format="JPEG", quality=95)
    with open(path, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_truncated_held_out_image_stops_before_training(root, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(root, data)
    bad = os.path.join(data, "PACS", "images", "sketch", "dog", "dog_001.png")  # sketch = the held-out domain
    _truncated_jpeg(bad)
    out = str(tmp_path / "o")
    refused(run_train_forked(args(data, out), str(tmp_path)), out, f"unreadable image {bad}")
    assert not os.path.exists(out)  # found at start-up: no log, no checkpoint


def test_truncated_open_set_image_stops_before_evaluation(root, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(root, data)
    split = json.load(open(os.path.join(data, "dtd", "split_zhou_DescribableTextures.json")))
    bad = os.path.join(data, "dtd", "images", split["test"][0][0])
    _truncated_jpeg(bad)
    out = str(tmp_path / "o")
    res = run_train_forked(args(data, out, trainer="ZeroshotCLIP", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                                flags=["--eval-only"]), str(tmp_path))
    refused(res, out, f"unreadable image {bad}")
    assert not os.path.exists(out)


def test_image_check_is_cached_per_tree(root, tmp_path):
    from dassl.data.verify import verify_images
    from dassl.utils.errors import DataError

    data = str(tmp_path / "data")
    shutil.copytree(os.path.join(root, "PACS"), os.path.join(data, "PACS"))
    shutil.copytree(os.path.join(root, "dtd"), os.path.join(data, "dtd"))
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(data) for f in fs if f.endswith(".png"))
    n = len(paths)
    assert verify_images(paths, data) == {"images": n, "decoded": n, "cached": 0}
    from dassl.utils.filecache import read_cache, tree_cache_file  # one cache file per tree in $CROFT_CACHE_DIR

    pacs_cache = tree_cache_file("image_checks", os.path.join(data, "PACS"))
    assert pacs_cache.startswith(os.path.join(os.environ["CROFT_CACHE_DIR"], "image_checks") + os.sep)
    assert len(read_cache(pacs_cache)) == len([p for p in paths if os.sep + "PACS" + os.sep in p])
    assert verify_images(paths, data) == {"images": n, "decoded": 0, "cached": n}  # a second run only stats
    os.utime(paths[0], ns=(1, 1))  # another mtime: checked again
    assert verify_images(paths, data) == {"images": n, "decoded": 1, "cached": n - 1}
    _truncated_jpeg(paths[1])  # bytes changed after a good check (other size): found
    with pytest.raises(DataError, match=re.escape(f"unreadable image {paths[1]}")):
        verify_images(paths, data)


def test_image_check_can_be_switched_off(root, tmp_path):
    from dassl.config import get_cfg_default
    from dassl.data import DataManager
    from dassl.utils.errors import DataError
    from datasets.lodo import PACS

    data = str(tmp_path / "data")
    shutil.copytree(root, data)
    _truncated_jpeg(os.path.join(data, "PACS", "images", "sketch", "dog", "dog_000.png"))
    cfg = get_cfg_default()
    cfg.DATASET.ROOT, cfg.DATASET.NAME, cfg.TEST_ENV, cfg.VERBOSE = data, "PACS", "sketch", False
    with pytest.raises(DataError, match="dog_000.png"):
        DataManager(cfg, dataset=PACS(cfg))
    cfg.DATASET.VERIFY_IMAGES = False
    assert len(DataManager(cfg, dataset=PACS(cfg)).dataset.test) == 6


# ------------------------------------------------------------------ VLCS layout: counts and warnings in the record
def test_vlcs_run_records_domain_counts_and_warnings(tmp_path):
    """DomainBed's VLCS (LabelMe, ...) through the split builder, one class missing in one domain: the run's log
    and record show the substring rule's per-domain counts (everything ``sun`` under the README's upper-case
    folders), the rule/folder disagreement and the missing class."""
    raw = tmp_path / "raw"
    for di, dom in enumerate(("Caltech101", "LabelMe", "SUN09", "VOC2007")):
        for ci, cls in enumerate(("bird", "car", "chair")):
            if (dom, cls) == ("LabelMe", "chair"):
                continue
            os.makedirs(raw / dom / cls)
            for i in range(3):
                draw_sample(ci, di, i, 16).save(raw / dom / cls / f"{i}.png")
    data = str(tmp_path / "data")
    _tool("build_lodo_splits").build_splits("VLCS", str(raw), data, log=lambda _m: None)
    out = str(tmp_path / "o")
    a = args(data, out, dataset_cfg="configs/datasets/VLCS.yaml", extra=["TEST_ENV", "pascal"])
    rec = run_cli(a)
    split = json.load(open(os.path.join(data, "VLCS", "test_on_pascal.json")))
    assert rec["data"]["domain_counts"] == {k: {"sun": len(split[k])} for k in ("test", "train", "val")}
    assert rec["data"]["folder_counts"]["test"] == {"PASCAL": len(split["test"])}
    warnings = rec["data"]["warnings"]
    assert len(warnings) == 2
    assert "DATASET.DOMAIN_MATCH substring assigns" in warnings[0] and "LABELME -> sun" in warnings[0]
    assert warnings[1] == "domain folder LABELME has no images of class(es) chair in test_on_pascal.json"
    log = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    for w in warnings:
        assert f"WARNING: VLCS: {w}" in log
    n = {k: len(split[k]) for k in ("train", "val", "test")}
    assert (f"VLCS domains (DATASET.DOMAIN_MATCH substring) in test_on_pascal.json: train sun {n['train']}; "
            f"val sun {n['val']}; test sun {n['test']}\n") in log


# ------------------------------------------------------------------ tools/check_data.py
def test_check_data_exits_0_when_present_datasets_load(root, tmp_path, capsys):
    mod = _tool("check_data")
    assert mod.main(["--root", root]) == 0  # no VLCS, no ImageNet here: not present, not failures
    out = capsys.readouterr().out
    assert "[ -- ] ImageNet46: not present" in out and "[ -- ] VLCS: not present" in out
    assert "[ ok ] PACS_DTD [test_on_sketch]" in out and "all datasets present load" in out
    assert mod.main(["--root", root, "--datasets", "PACS", "PACS_DTD"]) == 0
    assert mod.main(["--root", root, "--datasets", "ImageNet46"]) == 1  # asked for: must load
    broken = str(tmp_path / "broken")
    shutil.copytree(root, broken)
    os.unlink(os.path.join(broken, "PACS", "test_on_cartoon.json"))
    capsys.readouterr()
    assert mod.main(["--root", broken]) == 1  # present but broken
    assert "[FAIL] PACS [test_on_cartoon]: split file not found" in capsys.readouterr().out


# ------------------------------------------------------------------ MODEL.INIT_WEIGHTS
def test_init_weights_initialise_the_prompt_learner(root, tmp_path, monkeypatch):
    """Upstream CoOp: ``load_pretrained_weights(prompt_learner, MODEL.INIT_WEIGHTS)`` at build time."""
    import train
    from dassl.engine import build_trainer

    src = str(tmp_path / "src")
    run_cli(args(root, src, trainer="CoOp"))
    init = os.path.join(src, "prompt_learner", "model-best.pth.tar")
    trained_ctx = torch.load(init, weights_only=True)["state_dict"]["ctx"]

    monkeypatch.chdir(COOP)  # relative config paths, as for users

    def built_ctx(extra):
        cfg = train.setup_cfg(train.get_parser().parse_args(args(root, str(tmp_path / "b"), "CoOp", extra=extra)))
        return build_trainer(cfg)._models["prompt_learner"].ctx.detach()

    assert torch.equal(built_ctx(["MODEL.INIT_WEIGHTS", init]), trained_ctx)
    assert not torch.equal(built_ctx([]), trained_ctx)  # without it: the seeded random initialisation


def test_init_weights_refused_where_not_read(root, tmp_path):
    import train
    from dassl.config import get_cfg_default
    from dassl.engine import TRAINER_REGISTRY

    train.extend_cfg(get_cfg_default())  # imports the trainer plug-ins
    readers = {n for n in TRAINER_REGISTRY.registered_names()
               if getattr(TRAINER_REGISTRY.get(n), "READS_INIT_WEIGHTS", False)}
    assert {"CoOp", "CoCoOp", "DPLCLIP", "BCAL", "LoCoOp"} <= readers  # the prompt trainers (docs/running.md)
    assert not readers & {"CRoFT", "CLIP_Adapter", "TIP_ADAPTER", "ZeroshotCLIP"}
    init = str(tmp_path / "prompt.pth")
    torch.save({"state_dict": {"ctx": torch.zeros(16, 32)}}, init)
    out = str(tmp_path / "o")
    refused(run_train_forked(args(root, out, trainer="CRoFT", extra=["MODEL.INIT_WEIGHTS", init]), str(tmp_path)),
            out, f"MODEL.INIT_WEIGHTS {init}: CRoFT does not read it")
    refused(run_train_forked(args(root, out, trainer="CoOp", extra=["MODEL.INIT_WEIGHTS", init + ".missing"]),
                             str(tmp_path)), out, f"MODEL.INIT_WEIGHTS file not found: {init}.missing")


# ------------------------------------------------------------------ ROC figures use the table's ID side
def test_roc_legend_auroc_is_the_tables(root, tmp_path):
    from sklearn.metrics import roc_auc_score

    from launch import figures

    out = str(tmp_path / "eval")
    rec = run_cli(args(root, out, trainer="ZeroshotCLIP", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                       flags=["--eval-only"], extra=["TEST.SAVE_PLOTS", "False"]))
    z = np.load(os.path.join(out, "scores.npz"))
    correct = z["test__logits"].argmax(1) == z["test__labels"]
    assert 0 < correct.sum() < len(correct)  # the two ID sides differ here
    for score in ("energy", "mcm", "msp", "knn"):
        id_s, ood_s, which = figures.table_id_side(out, score)
        det = rec["metrics"]["ood"][score]
        assert which.startswith("correctly classified" if det["id_correct_only"] else "all")
        fig = figures.roc_figure({f"ZS [ID: {which}]": (id_s, ood_s)})
        text = fig.axes[0].get_legend().get_texts()[0].get_text()
        legend_auroc = float(re.search(r"AUROC ([\d.]+)\)$", text).group(1))
        assert legend_auroc == round(100 * det["auroc"], 2), (score, text, det["auroc"])
        truth = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]  # scikit-learn on the table's ID side
        assert abs(roc_auc_score(truth, np.r_[id_s, ood_s]) - det["auroc"]) < 1e-9
    assert all(rec["metrics"]["ood"][s]["id_correct_only"] for s in ("energy", "mcm", "msp"))
    assert not rec["metrics"]["ood"]["knn"]["id_correct_only"]
