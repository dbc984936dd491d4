"""CoOp-family files drop in: trainer and dataset files written only against the upstream APIs (Dassl, OpenAI
``clip``; see ``tests/dropin_files``) are copied into ``trainers/``/``datasets/`` of a copy of the tree -- the
project's ``coop.py``, ``cocoop.py`` and ``zsclip.py`` replaced (the family's ``zsclip.py`` imports
``IMAGENET_TEMPLATES`` from the project's ``imagenet_templates.py``), nothing else edited -- and train + evaluate
through ``train.py`` with the family's yaml style and OpenAI-layout weights in ``~/.cache/clip``."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_logged_accuracy
from tiny_openai_clip import tiny_openai_state_dict

TESTS = os.path.dirname(os.path.abspath(__file__))
COOP = os.path.join(os.path.dirname(TESTS), "CoOp")
FILES = os.path.join(TESTS, "dropin_files")
CLASSES = ["banded", "dotted", "striped", "zigzagged"]
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]

DATASET_YAML = 'DATASET:\n  NAME: "DescribableTextures"\n'
TRAINER_YAML = """DATALOADER:
  TRAIN_X:
    BATCH_SIZE: {batch}
  TEST:
    BATCH_SIZE: 100
  NUM_WORKERS: 0

INPUT:
  SIZE: (32, 32)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]

OPTIM:
  NAME: "sgd"
  LR: 0.002
  MAX_EPOCH: {epochs}
  LR_SCHEDULER: "cosine"
  WARMUP_EPOCH: 1
  WARMUP_TYPE: "constant"
  WARMUP_CONS_LR: 1e-5

TRAIN:
  PRINT_FREQ: 5

MODEL:
  BACKBONE:
    NAME: "{backbone}"
{extra}"""
COCOOP_EXTRA = 'TRAINER:\n  COCOOP:\n    N_CTX: 4\n    CTX_INIT: "a photo of a"\n    PREC: "fp16"\n'


def _images(data: str) -> dict:
    """A DTD-like tree (images/<class>/*.png, 8 per class) and a CoOp split file (4 train, 2 val, 2 test)."""
    image_dir = os.path.join(data, "dtd", "images")
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for label, (name, color) in enumerate(zip(CLASSES, COLORS)):
        os.makedirs(os.path.join(image_dir, name))
        for i in range(8):
            pixels = np.clip(np.array(color) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(image_dir, name, f"{name}_{i}.png"))
            key = "train" if i < 4 else "val" if i < 6 else "test"
            split[key].append([f"{name}/{name}_{i}.png", label, name])
    with open(os.path.join(data, "dtd", "split_zhou_DescribableTextures.json"), "w") as f:
        json.dump(split, f)
    return split


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("dropin")
    code = str(base / "CoOp")
    shutil.copytree(COOP, code, ignore=shutil.ignore_patterns("__pycache__", "output", "*.pyc"))
    for name in ("coop.py", "cocoop.py", "zsclip.py"):
        shutil.copy(os.path.join(FILES, name), os.path.join(code, "trainers", name))
    for name in ("dtd.py", "oxford_pets.py"):
        shutil.copy(os.path.join(FILES, name), os.path.join(code, "datasets", name))
    cache = base / "home" / ".cache" / "clip"
    cache.mkdir(parents=True)
    torch.save(tiny_openai_state_dict("rn", 0), cache / "RN50.pt")
    torch.save(tiny_openai_state_dict("vit", 1), cache / "ViT-B-16.pt")
    cfgs = base / "configs"
    (cfgs / "datasets").mkdir(parents=True)
    (cfgs / "datasets" / "dtd.yaml").write_text(DATASET_YAML)
    for trainer, fname, batch, epochs, backbone, extra in (
            ("CoOp", "rn50_ep50.yaml", 4, 2, "RN50", ""),
            ("CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1.yaml", 1, 1, "ViT-B/16", COCOOP_EXTRA)):
        (cfgs / "trainers" / trainer).mkdir(parents=True)
        (cfgs / "trainers" / trainer / fname).write_text(
            TRAINER_YAML.format(batch=batch, epochs=epochs, backbone=backbone, extra=extra))
    data = str(base / "data")
    _images(data)
    return {"base": base, "code": code, "data": data, "cfgs": str(cfgs), "home": str(base / "home")}


def _run(tree, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HOME=tree["home"], HF_HUB_OFFLINE="1", CROFT_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "train.py", "--root", tree["data"], "--seed", "1", *args],
                          cwd=tree["code"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_accuracy(out_dir: str) -> None:
    """The record's accuracy is the logged correct / total of the run (not just a number in [0, 100])."""
    with open(os.path.join(out_dir, "record.json")) as f:
        assert_logged_accuracy(out_dir, json.load(f))


class _PlainDatum:
    """Upstream Dassl's Datum as pickle sees it: a plain object whose instance dict is restored."""


@pytest.mark.slow
def test_coop_and_zero_shot_files_train_and_evaluate(tree):
    out = str(tree["base"] / "out_coop")
    cfg = tree["cfgs"]
    proc = _run(tree, "--trainer", "CoOp", "--dataset-config-file", f"{cfg}/datasets/dtd.yaml",
                "--config-file", f"{cfg}/trainers/CoOp/rn50_ep50.yaml", "--output-dir", out,
                "TRAINER.COOP.N_CTX", "4", "TRAINER.COOP.CSC", "False", "TRAINER.COOP.CLASS_TOKEN_POSITION", "end",
                "DATASET.NUM_SHOTS", "2")
    assert "epoch [2/2]" in proc.stdout and "* accuracy:" in proc.stdout
    assert os.path.isfile(os.path.join(out, "prompt_learner", "model.pth.tar-2"))
    _check_accuracy(out)
    # the few-shot cache is written in the official CRoFT Datum layout: upstream Dassl's four attributes (what
    # upstream Dassl reads) plus the official fork's domain name and domain list
    fewshot = os.path.join(tree["data"], "dtd", "split_fewshot", "shot_2-seed_1.pkl")

    class _Reader(pickle.Unpickler):
        def find_class(self, module, name):
            return _PlainDatum if name == "Datum" else super().find_class(module, name)

    with open(fewshot, "rb") as f:
        cached = _Reader(io.BytesIO(f.read())).load()
    assert len(cached["train"]) == 2 * len(CLASSES) and len(cached["val"]) == 2 * len(CLASSES)
    assert set(vars(cached["train"][0])) == {"_impath", "_label", "_domain", "_classname", "_domainname",
                                             "_alldomain"}
    # evaluation of the saved prompt through the family's own load_model
    ev = _run(tree, "--trainer", "CoOp", "--dataset-config-file", f"{cfg}/datasets/dtd.yaml",
              "--config-file", f"{cfg}/trainers/CoOp/rn50_ep50.yaml", "--output-dir", str(tree["base"] / "ev"),
              "--eval-only", "--model-dir", out, "--load-epoch", "2", "TRAINER.COOP.N_CTX", "4",
              "DATASET.NUM_SHOTS", "2")
    assert "Loading weights to prompt_learner" in ev.stdout and "* accuracy:" in ev.stdout
    # zero-shot CLIP of the family (fp16 CLIP on CPU, logits-only model_inference)
    zs = str(tree["base"] / "out_zs")
    proc = _run(tree, "--trainer", "ZeroshotCLIP", "--dataset-config-file", f"{cfg}/datasets/dtd.yaml",
                "--config-file", f"{cfg}/trainers/CoOp/rn50_ep50.yaml", "--output-dir", zs, "--eval-only")
    assert "* accuracy:" in proc.stdout
    _check_accuracy(zs)


@pytest.mark.slow
def test_cocoop_file_trains_on_base_classes(tree):
    out = str(tree["base"] / "out_cocoop")
    cfg = tree["cfgs"]
    proc = _run(tree, "--trainer", "CoCoOp", "--dataset-config-file", f"{cfg}/datasets/dtd.yaml",
                "--config-file", f"{cfg}/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml", "--output-dir", out,
                "DATASET.NUM_SHOTS", "2", "DATASET.SUBSAMPLE_CLASSES", "base")
    with open(os.path.join(out, "record.json")) as f:
        record = json.load(f)
    assert record["config"]["DATASET"]["SUBSAMPLE_CLASSES"] == "base"
    assert "* total: 4" in proc.stdout  # 2 base classes x 2 test images
    _check_accuracy(out)


def test_broken_plugin_is_one_line_naming_the_file(tmp_path):
    code = str(tmp_path / "CoOp")
    shutil.copytree(COOP, code, ignore=shutil.ignore_patterns("__pycache__", "output"))
    with open(os.path.join(code, "trainers", "broken_trainer.py"), "w") as f:
        f.write("import no_such_module_anywhere\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "train.py", "--trainer", "CoOp"], cwd=code, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "broken_trainer.py" in lines[0] and "no_such_module_anywhere" in lines[0]


def test_load_plugins_imports_every_module_and_module_hooks(tmp_path):
    from dassl.config import COMPAT_KEYS, add_coop_config, get_cfg_default
    from dassl.utils.errors import UserError
    from dassl.utils.plugins import load_plugins

    pkg = tmp_path / "dropin_probe_plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "alpha.py").write_text("from .beta import VALUE\n\ndef extend_cfg(cfg):\n    cfg.PROBE = VALUE\n")
    (pkg / "beta.py").write_text("VALUE = 7\n")
    (pkg / "_private.py").write_text("raise SystemExit('must not be imported')\n")
    modules = load_plugins(str(tmp_path), folders=("dropin_probe_plugins",))
    assert [m.__name__ for m in modules] == ["dropin_probe_plugins.alpha", "dropin_probe_plugins.beta"]
    cfg = get_cfg_default()
    modules[0].extend_cfg(cfg)
    assert cfg.PROBE == 7
    (pkg / "gamma.py").write_text("1 / 0\n")
    with pytest.raises(UserError, match="gamma.py: ZeroDivisionError"):
        load_plugins(str(tmp_path), folders=("dropin_probe_plugins",))
    other = tmp_path / "elsewhere" / "dropin_probe_plugins"
    other.mkdir(parents=True)
    with pytest.raises(UserError, match="already imported"):
        load_plugins(str(tmp_path / "elsewhere"), folders=("dropin_probe_plugins",))
    # CoOp's keys, with upstream defaults, on a tree that lacks them
    bare = get_cfg_default()
    bare.TRAINER.pop("COOP", None)
    add_coop_config(bare)
    assert bare.TRAINER.COOP.N_CTX == 16 and bare.TRAINER.COOP.PREC == "fp16"
    assert bare.TRAINER.COCOOP.CTX_INIT == "" and bare.DATASET.SUBSAMPLE_CLASSES == "all"
    for key in COMPAT_KEYS:  # every listed compatibility key exists after add_coop_config
        node = bare
        for part in key.split("."):
            node = node[part]
