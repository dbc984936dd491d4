"""Foundation: registry, config layering, LR schedule vs golden, transforms, samplers, checkpoints, CLI."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (COOP, TINY, assert_logged_accuracy, cli_args, load_fixture, register_probe_trainer,
                     run_cli)
from synthetic import write_lodo_tree


@pytest.fixture(scope="module")
def pacs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_lodo_tree(str(root), per_class=6)
    return str(root)


# ------------------------------------------------------------------ registry / config
def test_registry_suggests_nearest_name():
    from dassl.engine import TRAINER_REGISTRY
    from dassl.utils.errors import ConfigError
    import trainers  # noqa: F401

    assert TRAINER_REGISTRY.get("ZeroshotCLIP").__name__ == "ZeroshotCLIP"
    with pytest.raises(ConfigError, match="did you mean 'ZeroshotCLIP'"):
        TRAINER_REGISTRY.get("ZeroshotClip")


def test_registry_rejects_duplicates():
    from dassl.utils.registry import Registry

    reg = Registry("THING")

    @reg.register()
    class A:  # noqa: D401
        pass

    class B:
        pass
    B.__name__ = "A"
    with pytest.raises(KeyError):
        reg.register(B)


def test_config_precedence_and_round_trip(tmp_path):
    import train

    args = train.get_parser().parse_args([
        "--trainer", "ZeroshotCLIP", "--dataset-config-file", os.path.join(COOP, "configs/datasets/PACS.yaml"),
        "--config-file", os.path.join(COOP, "configs/trainers/CRoFT/rn50_ep30.yaml"), "--seed", "0",
        "--backbone", "ViT-B/16", "OPTIM.LR", "0.5", "MODEL.BACKBONE.NAME", "RN50"])
    cfg = train.setup_cfg(args)
    assert cfg.SEED == 0                       # --seed 0 is honoured
    assert cfg.DATASET.NAME == "PACS"          # dataset yaml
    assert cfg.OPTIM.MAX_EPOCH == 30           # trainer yaml
    assert cfg.OPTIM.LR == 0.5                 # override beats yaml
    assert cfg.MODEL.BACKBONE.NAME == "RN50"   # override beats flag
    assert cfg.OPTIM.WEIGHT_DECAY == 0.1       # official default
    dumped = tmp_path / "c.yaml"
    dumped.write_text(cfg.dump())
    from dassl.config import clean_cfg, get_cfg_default

    assert set(cfg.TRAINER) == {"NAME", "ZSCLIP"}  # the saved config holds only the running trainer's node
    cfg2 = get_cfg_default()
    train.extend_cfg(cfg2)
    cfg2.merge_from_file(str(dumped))
    clean_cfg(cfg2, "ZSCLIP")
    assert cfg2.dump() == cfg.dump()


def test_unknown_key_is_a_config_error():
    import train
    from dassl.utils.errors import ConfigError

    args = train.get_parser().parse_args(["--trainer", "ZeroshotCLIP", "OPTIM.NOPE", "1"])
    with pytest.raises(ConfigError, match="OPTIM.NOPE"):
        train.setup_cfg(args)


# ------------------------------------------------------------------ optim
def _croft_optim_cfg():
    import train
    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    train.extend_cfg(cfg)
    cfg.merge_from_file(os.path.join(COOP, "configs/trainers/CRoFT/rn50_ep30.yaml"))
    return cfg


def test_lr_sequence_matches_golden():
    from dassl.optim import build_lr_scheduler, build_optimizer

    fx = load_fixture()
    cfg = _croft_optim_cfg()
    assert int(fx["lr_schedule__max_epoch"]) == cfg.OPTIM.MAX_EPOCH
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.OPTIM)
    sched = build_lr_scheduler(opt, cfg.OPTIM)
    lrs = []
    for _ in range(cfg.OPTIM.MAX_EPOCH):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, fx["lr_schedule__lr_per_epoch"], rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("kind,warm", [("single_step", "linear"), ("constant", "constant"), ("cosine", "linear")])
def test_other_schedules(kind, warm):
    from dassl.optim import build_lr_scheduler, build_optimizer

    cfg = _croft_optim_cfg()
    cfg.defrost()
    cfg.OPTIM.LR_SCHEDULER = kind
    cfg.OPTIM.WARMUP_TYPE = warm
    cfg.OPTIM.WARMUP_EPOCH = 2
    cfg.OPTIM.STEPSIZE = (5,)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.OPTIM)
    sched = build_lr_scheduler(opt, cfg.OPTIM)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if warm == "linear":
        assert lrs[0] == pytest.approx(cfg.OPTIM.WARMUP_MIN_LR) and lrs[1] == pytest.approx(0.001)
    else:
        assert lrs[:2] == [pytest.approx(1e-5)] * 2
    assert lrs[2] == pytest.approx(0.002)
    if kind == "single_step":
        assert lrs[7] == pytest.approx(0.0002)
    if kind == "constant":
        assert lrs[9] == pytest.approx(0.002)


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    from dassl.optim import build_optimizer
    from dassl.utils.errors import ConfigError

    cfg = _croft_optim_cfg()
    cfg.defrost()
    cfg.OPTIM.NAME = name
    lin = torch.nn.Linear(2, 2)
    lin.bias.requires_grad_(False)
    opt = build_optimizer(lin, cfg.OPTIM)
    assert isinstance(opt, cls) and len(opt.param_groups[0]["params"]) == 1
    assert opt.param_groups[0]["weight_decay"] == 0.1
    cfg.OPTIM.NAME = "lion"
    with pytest.raises(ConfigError):
        build_optimizer(lin, cfg.OPTIM)


# ------------------------------------------------------------------ data
def test_transforms_train_and_test():
    from dassl.config import get_cfg_default
    from dassl.data.transforms import build_transform
    from dassl.utils.errors import ConfigError

    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (24, 24)
    cfg.INPUT.TRANSFORMS = ("random_resized_crop", "random_flip", "normalize")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    tr, te = build_transform(cfg, True), build_transform(cfg, False)
    names = [type(t).__name__ for t in tr.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert [type(t).__name__ for t in te.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert tr(img).shape == (3, 24, 24) and te(img).shape == (3, 24, 24)
    assert torch.equal(te(img), te(img))   # deterministic test transform
    cfg.INPUT.TRANSFORMS = ("random_rotate",)
    with pytest.raises(ConfigError, match="random_rotate"):
        build_transform(cfg, True)


def _items(n_per=(10, 10, 10), domains=3):
    from dassl.data.datasets import Datum

    out = []
    for lab, n in enumerate(n_per):
        for i in range(n):
            out.append(Datum(f"x/{lab}/{i}.png", lab, i % domains, f"c{lab}"))
    return out


def test_fewshot_samplers():
    from dassl.data.datasets import DatasetBase

    ds = DatasetBase(train_x=_items())
    random.seed(0)
    few = ds.generate_fewshot_dataset(_items(), num_shots=4)
    assert Counter(d.label for d in few) == {0: 4, 1: 4, 2: 4}
    assert ds.generate_fewshot_dataset(_items((2, 9, 9)), num_shots=4).__len__() == 10  # fewer -> all
    random.seed(0)
    fixed = ds.generate_fewshot_per_class_domain(_items((12, 12, 12)), num_shots=6)
    assert Counter((d.label, d.domain) for d in fixed) == {(c, d): 2 for c in range(3) for d in range(3)}
    random.seed(0)
    official = ds.generate_fewshot_dataset_balance(_items((30, 5, 30)), num_shots=6)
    # official bug: 6 // 3 domains = 2 per domain per label iteration, drawn regardless of class;
    # the label with fewer than 6 images contributes all of its items instead
    assert len(official) == 2 * 3 * 2 + 5
    assert ds.num_classes == 3 and ds.classnames == ["c0", "c1", "c2"]


def test_lodo_dataset_reads_pacs_layout(pacs_root):
    from dassl.config import get_cfg_default
    from dassl.data import DataManager
    import datasets  # noqa: F401

    cfg = get_cfg_default()
    cfg.DATASET.NAME, cfg.DATASET.ROOT, cfg.TEST_ENV = "PACS", pacs_root, "test_on_sketch.json"
    cfg.DATASET.NUM_SHOTS = 3
    cfg.INPUT.SIZE = (32, 32)
    cfg.DATASET.FEWSHOT_SAMPLER = "per_class_domain"
    dm = DataManager(cfg)
    ds = dm.dataset
    assert ds.classnames == ["dog", "elephant", "giraffe"]
    assert {d.domainname for d in ds.test} == {"sketch"}
    assert {d.domainname for d in ds.train_x} == {"art_painting", "cartoon", "photo"}
    assert len(ds.val) == 3 * 3 and len(ds.train_x) == 3 * 3
    batch = next(iter(dm.test_loader))
    assert batch["img"].shape[1:] == (3, 32, 32)


# ------------------------------------------------------------------ CLI end to end
def test_cli_zeroshot_eval_only(pacs_root, tmp_path):
    out = str(tmp_path / "zs")
    rec = run_cli(cli_args(pacs_root, out, "ZeroshotCLIP", flags=["--eval-only"]))
    assert_logged_accuracy(out, rec)
    assert os.path.isfile(os.path.join(out, "done"))
    with open(os.path.join(out, "record.json")) as f:
        on_disk = json.load(f)
    assert on_disk["metrics"]["test"]["accuracy"] == rec["metrics"]["test"]["accuracy"]
    assert on_disk["seed"] == 1 and on_disk["trainer"] == "ZeroshotCLIP" and "torch" in on_disk["versions"]
    assert len(on_disk["versions"].get("git", "x" * 40)) >= 40  # the commit, when run from a checkout
    log = open(os.path.join(out, "log.txt")).read()
    assert "* accuracy:" in log and "** Config **" in log


def _probe_run(root, out, extra=()):
    register_probe_trainer()
    return run_cli(cli_args(root, out, "TestProbe", extra=["OPTIM.MAX_EPOCH", "3", "TRAIN.CHECKPOINT_FREQ", "1",
                                                           "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.LR",
                                                           "0.05", "OPTIM.WEIGHT_DECAY", "5e-4", *extra]))


def test_cli_training_and_kill_resume(pacs_root, tmp_path):
    cls = register_probe_trainer()
    full = _probe_run(pacs_root, str(tmp_path / "a"))
    assert_logged_accuracy(str(tmp_path / "a"), full)
    assert full["best_epoch"] in (1, 2, 3)
    ref = torch.load(tmp_path / "a" / "probe" / "model.pth.tar-3", weights_only=False)["state_dict"]
    cls.crash_at_epoch = 2
    try:
        with pytest.raises(KeyboardInterrupt):
            _probe_run(pacs_root, str(tmp_path / "b"))
    finally:
        cls.crash_at_epoch = -1
    assert not (tmp_path / "b" / "done").exists()
    assert (tmp_path / "b" / "probe" / "model.pth.tar-2").exists()
    resumed = _probe_run(pacs_root, str(tmp_path / "b"))
    got = torch.load(tmp_path / "b" / "probe" / "model.pth.tar-3", weights_only=False)["state_dict"]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    assert resumed["metrics"]["test"] == full["metrics"]["test"]
    log_files = [f for f in os.listdir(tmp_path / "b") if f.startswith("log.txt")]
    assert log_files == ["log.txt"]  # one log: the resumed run appends to it after the restart marker
    log = (tmp_path / "b" / "log.txt").read_text()
    assert log.count("** Config **") == 2 and log.count("*** log continues: run started again") == 1
    assert log.index("epoch [2/3]") < log.index("*** log continues") < log.index("will resume training")


def test_checkpoint_round_trip_eval(pacs_root, tmp_path):
    trained = _probe_run(pacs_root, str(tmp_path / "t"))
    rec1 = run_cli(cli_args(pacs_root, str(tmp_path / "e1"), "TestProbe", flags=["--eval-only", "--model-dir",
                                                                                 str(tmp_path / "t")]))
    rec2 = run_cli(cli_args(pacs_root, str(tmp_path / "e2"), "TestProbe", flags=["--eval-only", "--model-dir",
                                                                                 str(tmp_path / "t"),
                                                                                 "--load-epoch", "3"]))
    assert rec2["mode"] == "eval"
    assert rec1["metrics"]["test"] == trained["metrics"]["test"]  # model-best reloaded = the deployed model
    assert_logged_accuracy(str(tmp_path / "e1"), rec1)
    assert_logged_accuracy(str(tmp_path / "e2"), rec2)


# ------------------------------------------------------------------ bad input (real subprocess: exit codes)
def _cli(args, cwd=COOP):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("case", ["weights", "trainer", "key", "root", "split"])
def test_bad_input_one_line_error(case, pacs_root, tmp_path):
    out = tmp_path / "never"
    base = ["--root", pacs_root, "--trainer", "ZeroshotCLIP", "--dataset-config-file", "configs/datasets/PACS.yaml",
            "--config-file", "configs/trainers/ZeroshotCLIP/rn50_ep30.yaml", "--output-dir", str(out),
            "--eval-only", "DATALOADER.NUM_WORKERS", "0"]
    extra = {"weights": ["TEST_ENV", "sketch", "MODEL.BACKBONE.WEIGHTS", str(tmp_path / "missing.pt")],
             "trainer": ["TEST_ENV", "sketch", "TRAINER.NAME", "CRoFt"],
             "key": ["TEST_ENV", "sketch", "TRAINER.CROFT.NOPE", "1"],
             "root": ["TEST_ENV", "sketch", "DATASET.ROOT", str(tmp_path / "nowhere")],
             "split": ["TEST_ENV", "mars"]}[case]
    res = _cli(base + extra)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert not out.exists()
    if case == "weights":
        assert "missing.pt" in lines[0]


def test_unreadable_image_is_reported(tmp_path):
    root = tmp_path / "d"
    write_lodo_tree(str(root), per_class=2)
    bad = root / "PACS" / "images" / "sketch" / "dog" / "dog_000.png"
    bad.write_bytes(b"not a png")
    res = _cli(["--root", str(root), "--trainer", "ZeroshotCLIP", "--dataset-config-file",
                "configs/datasets/PACS.yaml", "--output-dir", str(tmp_path / "o"), "--eval-only", *TINY,
                "TEST_ENV", "sketch"])
    assert res.returncode == 2
    assert "unreadable image" in res.stderr and "dog_000.png" in res.stderr


def test_help():
    res = _cli(["--help"])
    assert res.returncode == 0 and "--dataset-config-file" in res.stdout and "--eval-only" in res.stdout


def test_tensorboard_flag(pacs_root, tmp_path):
    """TensorBoard scalars when the package is there; one clear config error (and no run dir) when it is not."""
    import importlib.util

    from dassl.utils.errors import ConfigError

    args = cli_args(pacs_root, str(tmp_path / "tb"), "ZeroshotCLIP", flags=["--eval-only"],
                    extra=["TRAIN.TENSORBOARD", "True"])
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="tensorboard"):
            run_cli(args)
        assert not (tmp_path / "tb").exists()
    else:  # pragma: no cover - depends on the environment
        register_probe_trainer()
        run_cli(cli_args(pacs_root, str(tmp_path / "tb2"), "TestProbe", extra=["TRAIN.TENSORBOARD", "True",
                                                                             "OPTIM.MAX_EPOCH", "1"]))
        assert os.listdir(tmp_path / "tb2" / "tensorboard")


def test_gpu_check_script_smoke(capsys):
    """The accelerator check runs end to end (here CPU vs CPU: fp32 must match exactly)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(COOP, "tools", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--backbone", "tiny-vit-test", "--size", "32", "--batch", "4",
                     "--steps", "1", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert '"fc_i": 0.0' in out and '"bf16"' in out


def test_macro_f1_equals_scikit_learn():
    """The evaluator's macro F1 (bincount) is scikit-learn's ``f1_score(average="macro", labels=unique(y_true))``,
    including classes never predicted, predictions of classes absent from the truth, and perfect predictions."""
    from sklearn.metrics import f1_score

    from dassl.evaluation.evaluator import macro_f1_score

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 7, 200), rng.integers(0, 9, 200)),   # predicts classes 7, 8 that never occur
             (rng.integers(0, 5, 50), np.zeros(50, dtype=int)),     # one class predicted only
             (np.array([3, 3, 1]), np.array([3, 3, 1])),            # perfect, labels with gaps
             (np.array([2]), np.array([0]))]
    for t, p in cases:
        want = f1_score(t, p, average="macro", labels=np.unique(t), zero_division=0)
        assert macro_f1_score(t.tolist(), p.tolist()) == pytest.approx(want, abs=1e-12)
