"""Bayes-CAL (``BCAL``): loss pieces against hand computations, the trainer on synthetic PACS, drivers."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import COOP, assert_logged_accuracy, assert_ood_matches_scores, cli_args, run_cli
from synthetic import DEFAULT_DOMAINS, write_lodo_tree

FAST = ["OPTIM.WARMUP_EPOCH", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8"]


# ------------------------------------------------------------------ loss pieces (hand-computed values)
def test_gaussian_kl_hand_value():
    from trainers.bcal_losses import gaussian_kl

    # element 1: N(0, 1) -> 0; element 2: 0.5 * (0.25 + 1 - 1 - log 0.25)
    got = gaussian_kl(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5]))
    assert got.item() == pytest.approx(0.5 * (0.25 + math.log(4.0)), rel=1e-6)


def test_irm_penalty_hand_value_and_gradient():
    from trainers.bcal_losses import irm_penalty

    # env 0: logits (2, 0), label 0 -> d/ds CE = (p0 - 1) * 2 = -2 / (e^2 + 1); env 1: logits (0, 0) -> 0
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]], requires_grad=True)
    pen = irm_penalty(logits, torch.tensor([0, 1]), torch.tensor([0, 1]))
    expected = 0.5 * (2.0 / (math.e ** 2 + 1)) ** 2
    assert pen.item() == pytest.approx(expected, rel=1e-6)
    (g,) = torch.autograd.grad(pen, logits)
    assert g[0].abs().sum() > 0            # the penalty trains what produced the logits
    one_env = irm_penalty(logits, torch.tensor([0, 1]), torch.tensor([3, 3]))
    # one environment: grad = mean of the two samples' terms = -1 / (e^2 + 1)
    assert one_env.item() == pytest.approx((1.0 / (math.e ** 2 + 1)) ** 2, rel=1e-6)


def test_feature_gradients_match_autograd_and_alignment_hand_value():
    from trainers.bcal_losses import ce_feature_gradients, gradient_alignment

    torch.manual_seed(0)
    feats = torch.randn(5, 4, requires_grad=True)
    cls = torch.randn(3, 4)
    labels = torch.tensor([0, 2, 1, 1, 0])
    (auto,) = torch.autograd.grad(F.cross_entropy(7.0 * feats @ cls.t(), labels, reduction="sum"), feats)
    torch.testing.assert_close(ce_feature_gradients(feats, cls, labels, 7.0), auto)
    # x = 0 -> p = (1/2, 1/2); g_a = (p - e0) @ I = (-1/2, 1/2); g_b = (p - e0) @ [[1, 0], [1, 1]] = (0, 1/2)
    x = torch.zeros(1, 2)
    g_a = ce_feature_gradients(x, torch.eye(2), torch.tensor([0]), 1.0)
    g_b = ce_feature_gradients(x, torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([0]), 1.0)
    torch.testing.assert_close(g_a, torch.tensor([[-0.5, 0.5]]))
    torch.testing.assert_close(g_b, torch.tensor([[0.0, 0.5]]))
    assert gradient_alignment(g_a, g_b).item() == pytest.approx(0.5, rel=1e-6)
    assert gradient_alignment(torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
                              torch.tensor([[0.0, 2.0], [-3.0, -3.0]])).item() == pytest.approx(0.5, rel=1e-6)


def test_total_loss_weights_the_parts():
    from trainers.bcal_losses import bcal_loss

    torch.manual_seed(1)
    feats = F.normalize(torch.randn(6, 4), dim=-1)
    cls = F.normalize(torch.randn(3, 4), dim=-1)
    dom = F.normalize(torch.randn(2, 4), dim=-1)
    labels, domains = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    parts = bcal_loss(feats, cls, dom, labels, domains, 10.0, (0.0, 0.0, 0.0), torch.tensor(3.0), 0.0)
    assert parts.total.item() == pytest.approx(F.cross_entropy(10 * feats @ cls.t(), labels).item(), rel=1e-6)
    assert parts.ce_domain.item() == pytest.approx(F.cross_entropy(10 * feats @ dom.t(), domains).item(), rel=1e-6)
    w = bcal_loss(feats, cls, dom, labels, domains, 10.0, (0.1, 2.0, 3.0), torch.tensor(3.0), 0.5)
    expect = w.ce + 0.1 * w.ce_domain + 2.0 * w.irm + 3.0 * w.align + 0.5 * 3.0
    assert w.total.item() == pytest.approx(expect.item(), rel=1e-6) and w.irm > 0 and w.align > 0


# ------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_lodo_tree(root, per_class=4)
    try:
        from synthetic_openset import write_dtd_like
        write_dtd_like(root)
    except ImportError:
        pass
    return root


def build(root, out, extra=(), seed=1):
    import train
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed

    args = cli_args(root, str(out), "BCAL", config=os.path.join(COOP, "configs/trainers/BCAL/rn50_ep30.yaml"),
                    extra=FAST + list(extra), seed=seed, dataset_cfg=os.path.join(COOP, "configs/datasets/PACS.yaml"))
    cfg = train.setup_cfg(train.get_parser().parse_args(args))
    set_random_seed(cfg.SEED)
    return build_trainer(cfg)


def test_configs_and_official_defaults():
    import train
    from dassl.config import get_cfg_default

    for backbone, model in (("rn50", "RN50"), ("ViT", "ViT-B/16")):
        cfg = get_cfg_default()
        train.extend_cfg(cfg)
        cfg.merge_from_file(os.path.join(COOP, f"configs/trainers/BCAL/{backbone}_ep30.yaml"))
        assert cfg.MODEL.BACKBONE.NAME == model and cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 32
        assert (cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH, cfg.OPTIM.LR_SCHEDULER) == (0.002, 30, "cosine")
        c = cfg.TRAINER.BCAL
        assert (c.ALPHA1, c.ALPHA2, c.ALPHA3, c.KL_SCALE, c.SIGMA_INIT) == (0.01, 0.5, 0.01, 1e-8, 1e-5)
        assert c.PREC == "fp16" and c.N_CTX == 16 and list(c.DOMAIN_NAMES) == []


def test_trainer_builds_two_variational_learners(data_root, tmp_path):
    tr = build(data_root, tmp_path / "o")
    assert tr.domain_names == list(DEFAULT_DOMAINS)
    pl = tr._models["prompt_learner"]
    assert pl.category.n_cls == tr.num_classes and pl.context.n_cls == 4
    assert pl.category.ctx_mu.shape == (16, 32) and abs(pl.category.ctx_mu.std().item() - 0.02) < 0.004
    assert torch.all(pl.context.ctx_sigma == 1e-5)
    assert tr.prec == "fp32"  # CPU
    # training samples mu + sigma^2 * eps; evaluation uses mu
    pl.category.ctx_sigma.data.fill_(1.0)
    torch.testing.assert_close(pl.category.context(False), pl.category.ctx_mu)
    assert not torch.allclose(pl.category.context(True), pl.category.ctx_mu)


def test_training_lowers_the_loss_and_trains_both_learners(data_root, tmp_path):
    tr = build(data_root, tmp_path / "o", extra=["OPTIM.NAME", "adam", "OPTIM.LR", "0.02", "OPTIM.WEIGHT_DECAY", "0"])
    batch = next(iter(tr.train_loader_x))
    assert len(set(batch["domain"].tolist())) > 1
    pl = tr._models["prompt_learner"]
    before = {k: v.clone() for k, v in pl.state_dict().items()}
    clip_before = {k: v.clone() for k, v in tr.clip_model.state_dict().items()}
    tr.set_model_mode("train")
    tr.batch_idx, tr.num_batches = 0, 10 ** 9
    outs = [tr.forward_backward(batch) for _ in range(12)]
    assert outs[-1]["loss_ce"] < outs[0]["loss_ce"] and outs[-1]["loss"] < outs[0]["loss"]
    assert all(math.isfinite(o["irm"]) and 0 <= o["align"] <= 1 for o in outs)
    for k, v in tr.clip_model.state_dict().items():
        assert torch.equal(v, clip_before[k]), k
    changed = {k for k, v in pl.state_dict().items() if not torch.equal(v, before[k])}
    assert {"category.ctx_mu", "context.ctx_mu", "category.ctx_sigma", "context.ctx_sigma"} <= changed
    assert not any("token_" in k for k in changed)


def test_missing_domain_names_is_a_config_error_unless_named_fix():
    from types import SimpleNamespace

    from dassl.utils.errors import ConfigError
    from trainers.bcal import domain_names_of

    cfg = SimpleNamespace(TRAINER=SimpleNamespace(BCAL=SimpleNamespace(DOMAIN_NAMES=[])),
                          DATASET=SimpleNamespace(NAME="ImageNet46"))
    with pytest.raises(ConfigError, match="TRAINER.BCAL.DOMAIN_NAMES"):
        domain_names_of(cfg, SimpleNamespace())
    cfg.TRAINER.BCAL.DOMAIN_NAMES = ["imagenet"]
    assert domain_names_of(cfg, SimpleNamespace()) == ["imagenet"]


@pytest.mark.parametrize("key,value", [("TRAINER.BCAL.ALPHA2", "-1"), ("TRAINER.BCAL.SIGMA_INIT", "0"),
                                       ("TRAINER.BCAL.PREC", "fp8"), ("TRAINER.BCAL.CSC", "True")])
def test_bad_values_are_config_errors(key, value, data_root, tmp_path):
    from dassl.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        build(data_root, tmp_path / "o", extra=[key, value])


def test_cli_train_checkpoint_and_open_set_evaluation(data_root, tmp_path):
    out = str(tmp_path / "train")
    rec = run_cli(cli_args(data_root, out, "BCAL", config="configs/trainers/BCAL/rn50_ep30.yaml",
                           extra=FAST + ["OPTIM.MAX_EPOCH", "1"]))
    assert rec["mode"] == "train"
    assert_logged_accuracy(out, rec)
    assert rec["precision"] == {"requested": "fp16", "used": "fp32", "device": "cpu", "learnable_params": "float32"}
    sd = torch.load(os.path.join(out, "prompt_learner", "model.pth.tar-1"), weights_only=False)["state_dict"]
    assert {"category.ctx_mu", "category.ctx_sigma", "context.ctx_mu", "context.ctx_sigma"} <= set(sd)
    ev = str(tmp_path / "eval")
    try:
        import datasets.openset  # noqa: F401
    except ImportError:
        pytest.skip("datasets.openset missing")
    rec2 = run_cli(cli_args(data_root, ev, "BCAL", config="configs/trainers/BCAL/rn50_ep30.yaml",
                            dataset_cfg="configs/datasets/PACS_DTD.yaml", extra=FAST,
                            flags=["--eval-only", "--model-dir", out, "--load-epoch", "1"]))
    assert rec2["mode"] == "eval" and rec2["config"]["TRAINER"]["NAME"] == "BCAL"
    assert_ood_matches_scores(ev, rec2)
    assert "OODD_FPR95:" in open(os.path.join(ev, "log.txt")).read()


# ------------------------------------------------------------------ drivers
def _run_driver(path, argv, monkeypatch):
    """Run a driver script in-process as ``python <path> <argv>``; return its exit code."""
    import runpy

    monkeypatch.setattr(sys, "argv", [path, *argv])
    cwd = os.getcwd()
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        return stop.code
    finally:
        os.chdir(cwd)
    return 0


@pytest.mark.parametrize("script", ["run_setup1.py", "test_setup1.py"])
def test_setup1_drivers_need_the_named_fix(script, tmp_path, monkeypatch, capsys):
    path = os.path.join(COOP, "scripts", "BCAL", script)
    monkeypatch.setenv("DATA", str(tmp_path))
    assert _run_driver(path, ["--dry-run"], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TRAINER.BCAL.DOMAIN_NAMES" in err and "ImageNet46" in err
    code = _run_driver(path, ["--dry-run", "--seeds", "1", "--shots", "16", "--output-root", str(tmp_path / "o"),
                              "--", "TRAINER.BCAL.DOMAIN_NAMES", "['imagenet']"], monkeypatch)
    out = capsys.readouterr().out
    assert code == 0 and "TRAINER.BCAL.DOMAIN_NAMES" in out and "--trainer BCAL" in out


def test_setup2_driver_plans_the_official_grid():
    from launch import setup2

    cwd = os.getcwd()
    try:
        args, jobs = setup2.plan(["--root", "/nonexistent", "--dry-run"], trainer="BCAL")
    finally:
        os.chdir(cwd)
    # seeds 1-3 x PACS/VLCS x ViT_ep30/rn50_ep30 x 4 held-out domains, 16 shots
    assert len(jobs) == 3 * 2 * 2 * 4
    assert all("configs/trainers/BCAL/" in " ".join(j.argv) and "--trainer BCAL" in " ".join(j.argv) for j in jobs)
    assert all(os.sep + "BCAL" + os.sep in j.output_dir for j in jobs)
