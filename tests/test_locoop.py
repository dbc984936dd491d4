"""LoCoOp: the local-region entropy loss, top-K scaling, the trainer's step, configs, the official plan and the
Setup-II drivers (train, open-set evaluation with GL-MCM, collectors) on the tiny random CLIP and synthetic PACS.

Expected values come from hand computation (a two-region example) and an independent numpy implementation of
the authors' ``entropy_select_topk`` (softmax, top-K indices, regions whose top-K misses the label,
``-mean(sum(p log(p + 1e-5)))``), never from the code under test.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import COOP, TINY, assert_ood_matches_scores, cli_args

FAST = ["OPTIM.WARMUP_EPOCH", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8"]


def np_locoop(logits, local, labels, lam, k):
    """Independent numpy version of the authors' loss: CE(global) - lam * entropy of the non-top-K regions."""
    logits, local, labels = (np.asarray(a, dtype=np.float64) for a in (logits, local, labels))
    labels = labels.astype(int)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ce = float(np.mean(lse - logits[np.arange(len(labels)), labels]))
    entropies = []
    for i in range(local.shape[0]):
        for r in range(local.shape[1]):
            z = local[i, r] - local[i, r].max()
            p = np.exp(z) / np.exp(z).sum()
            top = np.argsort(-p, kind="stable")[:k]
            if labels[i] not in top:
                entropies.append(-np.sum(p * np.log(p + 1e-5)))
    ent = float(np.mean(entropies)) if entropies else 0.0
    return ce - lam * ent, ce, -ent


# ------------------------------------------------------------------ the loss
def test_loss_on_a_hand_computed_two_region_example():
    from trainers.locoop import locoop_loss

    logits = torch.tensor([[2.0, 0.0, 1.0]])
    local = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]]))  # region 1's top class is the label
    label = torch.tensor([0])
    ce = math.log(math.exp(2) + 1 + math.exp(1)) - 2
    h = -(0.1 * math.log(0.1 + 1e-5) + 0.6 * math.log(0.6 + 1e-5) + 0.3 * math.log(0.3 + 1e-5))  # region 2 only
    for k in (1, 2):
        loss, loss_id, loss_en = locoop_loss(logits, local, label, 0.25, k)
        assert loss_id.item() == pytest.approx(ce, rel=1e-6) and loss_en.item() == pytest.approx(-h, rel=1e-5)
        assert loss.item() == pytest.approx(ce - 0.25 * h, rel=1e-5)
    loss, _, loss_en = locoop_loss(logits, local, label, 0.25, 3)   # top-3 = all classes: no region selected
    assert loss_en.item() == 0.0 and loss.item() == pytest.approx(ce, rel=1e-6)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_loss_equals_an_independent_implementation_on_random_inputs(k):
    from trainers.locoop import locoop_loss

    g = torch.Generator().manual_seed(k)
    logits, local = 5 * torch.randn(6, 7, generator=g), 5 * torch.randn(6, 9, 7, generator=g)
    labels = torch.randint(0, 7, (6,), generator=g)
    got = locoop_loss(logits.double(), local.double(), labels, 0.25, k)
    want = np_locoop(logits.numpy(), local.numpy(), labels.numpy(), 0.25, k)
    for a, b in zip(got, want):
        assert a.item() == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("classes,expected", [(7, 1), (5, 1), (10, 2), (400, 80), (1000, 200), (3, 1)])
def test_default_top_k_is_a_fifth_of_the_classes(classes, expected):
    """TOPK 0 + TOPK_RATIO 0.2: the official K = 200 on ImageNet-1k; PACS 1, VLCS 1, DigitsDG 2, ImageNet46 80."""
    from trainers.locoop import resolve_topk

    assert resolve_topk(0, 0.2, classes) == expected
    assert resolve_topk(4, 0.2, 7) == 4 and resolve_topk(0, 1.0, 7) == 7


def test_top_k_errors_are_one_line():
    from dassl.utils.errors import ConfigError
    from trainers.locoop import resolve_topk

    for args, needle in (((200, 0.2, 7), "TRAINER.LOCOOP.TOPK=200 exceeds the 7 classes"),
                         ((0, 0.0, 7), "TOPK_RATIO is 0")):
        with pytest.raises(ConfigError) as err:
            resolve_topk(*args)
        assert needle in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from synthetic import write_lodo_tree
    from synthetic_openset import write_all_openset

    root = str(tmp_path_factory.mktemp("locoop_data"))
    write_lodo_tree(root, per_class=4)
    write_all_openset(root)
    return root


def build(root, out, extra=()):
    import train
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed

    args = cli_args(root, str(out), "LoCoOp", config=os.path.join(COOP, "configs/trainers/LoCoOp/rn50_ep30.yaml"),
                    dataset_cfg=os.path.join(COOP, "configs/datasets/PACS.yaml"),
                    extra=FAST + ["MODEL.BACKBONE.NAME", "tiny-vit-test"] + list(extra))
    cfg = train.setup_cfg(train.get_parser().parse_args(args))
    set_random_seed(cfg.SEED)
    return build_trainer(cfg)


def test_training_step_loss_is_the_locoop_loss_and_updates_only_the_context(data_root, tmp_path):
    from clip_backbone import LocalFeatureEncoder

    tr = build(data_root, tmp_path / "o", ["TRAINER.LOCOOP.TOPK", "2", "TRAINER.LOCOOP.LAMBDA", "0.5",
                                           "OPTIM.NAME", "adam", "OPTIM.LR", "0.05"])
    assert (tr.top_k, tr.lam, tr.wants_local) == (2, 0.5, True)
    batch = next(iter(tr.train_loader_x))
    with torch.no_grad():
        glob, local = LocalFeatureEncoder(tr.clip_model.visual)(batch["img"])
        t = F.normalize(tr.text_features(), dim=-1)
        logits = tr.logit_scale * F.normalize(glob, dim=-1) @ t.T
        local_logits = tr.logit_scale * F.normalize(local, dim=-1) @ t.T
    assert local_logits.shape == (len(batch["label"]), 16, 3)
    want = np_locoop(logits.numpy(), local_logits.numpy(), batch["label"].numpy(), 0.5, 2)
    before = {k: v.clone() for k, v in tr.prompt_learner.state_dict().items()}
    tr.set_model_mode("train")
    tr.batch_idx, tr.num_batches = 0, 10 ** 9
    got = tr.forward_backward(batch)
    for key, value in zip(("loss", "loss_id", "loss_en"), want):
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key   # float32 vs float64
    assert want[2] < 0   # regions were selected: the entropy term is active
    changed = [k for k, v in tr.prompt_learner.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["ctx"]
    assert all(not p.requires_grad for p in tr.clip_model.parameters())


def test_inference_returns_local_logits_and_checkpoints_reload(data_root, tmp_path):
    tr = build(data_root, tmp_path / "a", ["OPTIM.NAME", "adam", "OPTIM.LR", "0.05"])
    tr.set_model_mode("train")
    tr.batch_idx, tr.num_batches = 0, 10 ** 9
    tr.forward_backward(next(iter(tr.train_loader_x)))
    batch = next(iter(tr.val_loader))
    tr.set_model_mode("eval")
    tr.infer_local = True   # as collect_outputs sets it on a detection split with a local score
    with torch.no_grad():
        ref = tr.model_inference(batch["img"])
    assert ref.local_logits.shape == (len(batch["label"]), 16, 3)
    tr.save_model(0, str(tmp_path / "ckpt"))
    sd = torch.load(tmp_path / "ckpt" / "prompt_learner" / "model.pth.tar-1", weights_only=False)["state_dict"]
    assert set(sd) == {"ctx", "token_prefix", "token_suffix"}
    assert tr.load_model_drop_keys() == {"token_prefix", "token_suffix"}   # rebuilt from the class names
    fresh = build(data_root, tmp_path / "b")
    fresh.load_model(str(tmp_path / "ckpt"), epoch=1)
    fresh.set_model_mode("eval")
    fresh.infer_local = True
    with torch.no_grad():
        out = fresh.model_inference(batch["img"])
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.local_logits, ref.local_logits)


@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_reduced_precision_keeps_logits_and_loss_in_fp32(prec, data_root, tmp_path, monkeypatch):
    """The GPU precision path forced on CPU: CLIP and the context in fp16/bf16, logits and the loss in fp32."""
    from dassl.engine.trainer import SimpleTrainer

    monkeypatch.setattr(SimpleTrainer, "resolve_precision", lambda self, p: p)
    tr = build(data_root, tmp_path / "o", ["TRAINER.LOCOOP.PREC", prec])
    assert tr.prompt_learner.ctx.dtype == (torch.float16 if prec == "fp16" else torch.bfloat16)
    tr.set_model_mode("train")
    tr.batch_idx, tr.num_batches = 0, 10 ** 9
    assert math.isfinite(tr.forward_backward(next(iter(tr.train_loader_x)))["loss"])
    tr.set_model_mode("eval")
    tr.infer_local = True
    with torch.no_grad():
        out = tr.model_inference(next(iter(tr.val_loader))["img"])
    assert out.logits.dtype == out.local_logits.dtype == torch.float32


class _Counting:
    """The trainer's local image encoder, counting its calls (the real encoder runs)."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, 0

    def __call__(self, images):
        self.calls += 1
        return self.encoder(images)


def test_validation_and_test_passes_do_not_compute_local_features(data_root, tmp_path):
    """One epoch: local features once per training batch (the loss needs them), none in the epoch's validation
    or the final test; their accuracy is what it was when every inference pass computed them."""
    tr = build(data_root, tmp_path / "a", ["OPTIM.MAX_EPOCH", "1", "OPTIM.NAME", "adam", "OPTIM.LR", "0.05"])
    counter = tr.local_image_encoder = _Counting(tr.local_image_encoder)
    tr.train(0, 1)
    assert counter.calls == len(tr.train_loader_x) and tr.val_loader is not None and not tr.infer_local
    acc = {split: dict(tr.test(split)) for split in ("val", "test")}
    assert acc["test"] == tr.metrics["test"]
    tr.infer_local = True   # the previous behaviour: every inference pass computed them
    assert {split: dict(tr.test(split)) for split in ("val", "test")} == acc
    assert counter.calls == len(tr.train_loader_x) + len(tr.val_loader) + len(tr.test_loader)


def test_absolute_top_k_above_the_classes_is_refused(data_root, tmp_path):
    from dassl.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="TOPK=200 exceeds the 3 classes"):
        build(data_root, tmp_path / "o", ["TRAINER.LOCOOP.TOPK", "200"])


def test_training_through_the_feature_cache_reads_cached_local_features(data_root, tmp_path):
    from helpers import run_cli

    out, cache = str(tmp_path / "run"), tmp_path / "fc"
    rec = run_cli(cli_args(data_root, out, "LoCoOp", config="configs/trainers/LoCoOp/rn50_ep30.yaml",
                           extra=FAST + ["MODEL.BACKBONE.NAME", "tiny-vit-test", "OPTIM.MAX_EPOCH", "1",
                                         "FEATURE_CACHE.ENABLED", "True", "FEATURE_CACHE.DIR", str(cache),
                                         "FEATURE_CACHE.TRAIN_VIEWS", "2"]))
    assert rec["feature_cache"]["hits"] > 0 and rec["feature_cache"]["fallbacks"] == 0
    kinds = sorted(os.listdir(os.path.join(cache, os.listdir(cache)[0])))
    assert kinds == ["test", "test_local", "train_v0", "train_v0_local", "train_v1", "train_v1_local"]
    assert "loss_en" in open(os.path.join(out, "log.txt")).read()


# ------------------------------------------------------------------ configs and the official plan
def test_configs_and_official_plan():
    import train
    from dassl.config import get_cfg_default
    from launch import official

    for backbone, model in (("rn50", "RN50"), ("ViT", "ViT-B/16")):
        cfg = get_cfg_default()
        train.extend_cfg(cfg)
        cfg.merge_from_file(os.path.join(COOP, f"configs/trainers/LoCoOp/{backbone}_ep30.yaml"))
        assert cfg.MODEL.BACKBONE.NAME == model and cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 32
        assert (cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH, cfg.OPTIM.LR_SCHEDULER) == ("sgd", 0.002, 30,
                                                                                              "cosine")
        assert (cfg.OPTIM.WARMUP_EPOCH, cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_CONS_LR) == (1, "constant", 1e-5)
        assert cfg.OPTIM.WEIGHT_DECAY == 0.1 and cfg.TEST.FINAL_MODEL == "best_val"   # the project's protocol
        c = cfg.TRAINER.LOCOOP
        assert (c.N_CTX, c.CSC, c.CLASS_TOKEN_POSITION, c.PREC, c.LAMBDA, c.TOPK, c.TOPK_RATIO) == (
            16, False, "end", "fp16", 0.25, 0, 0.2)
    for setup in (1, 2):
        opts = official.protocol("LoCoOp", setup).train_opts("ViT_ep30")
        given = dict(zip(opts[::2], opts[1::2]))
        assert given["TRAINER.LOCOOP.LAMBDA"] == "0.25" and given["TRAINER.LOCOOP.TOPK_RATIO"] == "0.2"
        assert given["TRAINER.LOCOOP.PREC"] == "fp16" and given["OPTIM.MAX_EPOCH"] == "30"
    assert official.protocol("LoCoOp", 1).shots == (1, 16, 32) and official.protocol("LoCoOp", 2).shots == (16,)


# ------------------------------------------------------------------ Setup-II drivers, GL-MCM and the collectors
def _run_driver(script, argv, monkeypatch):
    import runpy

    path = os.path.join(COOP, "scripts", "LoCoOp", script)
    monkeypatch.setattr(sys, "argv", [path, *argv])
    cwd = os.getcwd()
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        return stop.code
    finally:
        os.chdir(cwd)
    return 0


def test_setup2_drivers_train_evaluate_with_gl_mcm_and_collect(data_root, tmp_path, monkeypatch, capsys):
    import json

    from launch import collect

    out, ev = str(tmp_path / "output"), str(tmp_path / "eval")
    common = ["--root", data_root, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1", "--domains",
              "sketch", "--epochs", "1", "--shots", "2", "--output-root", out, "--eval-root", ev, "--launcher",
              "inprocess", "--ood", "DTD", "--", TINY[0], "tiny-vit-test", *TINY[2:],
              "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "TEST.OOD_SCORES", "['energy', 'mcm', 'gl_mcm']"]
    assert _run_driver("run_setup2.py", common, monkeypatch) == 0
    assert _run_driver("test_setup2.py", common, monkeypatch) == 0
    records = [os.path.join(d, "record.json") for d, _, f in os.walk(ev) if "record.json" in f]
    assert len(records) == 1
    run_dir = os.path.dirname(records[0])
    rec = json.load(open(records[0]))
    assert rec["trainer"] == "LoCoOp" and {"energy", "mcm", "gl_mcm"} <= set(rec["metrics"]["ood"])
    assert rec["config"]["TRAINER"]["LOCOOP"]["TOPK_RATIO"] == 0.2
    assert_ood_matches_scores(run_dir, rec, ("energy", "gl_mcm"))
    train_logs = [os.path.join(d, "log.txt") for d, _, f in os.walk(out) if "record.json" in f]
    assert len(train_logs) == 1 and "loss_en" in open(train_logs[0]).read()
    capsys.readouterr()
    collect.main("oodd", ["--root", ev, "--scores", "energy", "gl_mcm"])
    table = capsys.readouterr().out
    rows = [ln for ln in table.splitlines() if ln.startswith("| LoCoOp")]
    assert len(rows) == 2 and {r.split(" | ")[2] for r in rows} == {"energy", "gl_mcm"}, table
    collect.main("oodg", ["--root", out])
    assert any(ln.startswith("| LoCoOp") for ln in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("script", ["run_setup1.py", "test_setup1.py"])
def test_setup1_drivers_plan_the_official_locoop_runs(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATA", str(tmp_path))
    code = _run_driver(script, ["--dry-run", "--seeds", "1", "--shots", "16", "--output-root", str(tmp_path / "o")],
                       monkeypatch)
    out = capsys.readouterr().out
    assert code == 0 and "--trainer LoCoOp" in out and "configs/trainers/LoCoOp/ViT_ep30.yaml" in out
    assert "TRAINER.LOCOOP.TOPK_RATIO 0.2" in out and "TRAINER.LOCOOP.LAMBDA 0.25" in out


# ------------------------------------------------------------------ the demo
def test_demo_runs_locoop_and_scores_gl_mcm_where_a_model_has_local_features(tmp_path):
    import argparse

    from demo import methods as M, report, run

    assert "LoCoOp" in [m.trainer for m in M.METHODS] and report.SCORE_NAMES["gl_mcm"] == "GL-MCM"
    (tmp_path / "data" / "DigitsDG").mkdir(parents=True)
    (tmp_path / "data" / "DigitsDG" / "test_on_mnist.json").write_text("{}")
    args = argparse.Namespace(methods=None, full=False, seeds=[1], domains=["mnist"], epochs=None,
                              cache=str(tmp_path / "cache"))
    roots = (str(tmp_path / "o"), str(tmp_path / "e"))
    cwd = os.getcwd()
    try:
        evals = run.plan_all(args, str(tmp_path / "data"), "w.pt", roots, evaluate=True)
        trains = run.plan_all(args, str(tmp_path / "data"), "w.pt", roots, evaluate=False)
    finally:
        os.chdir(cwd)
    local = {"ZeroshotCLIP", "CoOp", "LoCoOp", "CRoFT"}
    for job in evals:
        trainer = job.argv[job.argv.index("--trainer") + 1]
        assert ("gl_mcm" in " ".join(job.argv)) == (trainer in local), trainer
    assert {j.argv[j.argv.index("--trainer") + 1] for j in evals} >= local | {"CLIP_Adapter"}
    assert not any("gl_mcm" in " ".join(j.argv) for j in trains)   # training runs keep their configuration
