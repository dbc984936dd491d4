"""Bayes-CAL (``BCAL``): loss pieces against hand computations, the trainer on synthetic PACS, drivers."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import COOP, assert_logged_accuracy, assert_ood_matches_scores, cli_args, run_cli
from synthetic import DEFAULT_DOMAINS, write_lodo_tree

FAST = ["OPTIM.WARMUP_EPOCH", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8"]


# ------------------------------------------------------------------ loss pieces (hand-computed values)
def test_variational_kl_hand_values_and_clamp():
    from trainers.bcal_losses import variational_kl

    # at init (sigma = sigma0, mu = mu0) each element is log(1 + 1e-3) + sigma^4 / (2 sigma0^4 + 1e-3)
    sig = torch.full((3, 4), 1e-5, dtype=torch.float64)
    mu = torch.zeros(3, 4, dtype=torch.float64)
    got = variational_kl(mu, sig, mu.clone(), sig.clone(), 1e-8)
    assert got.item() == pytest.approx(1e-8 * 12 * (math.log(1.001) + 1e-20 / (2e-20 + 1e-3)), rel=1e-12)
    # sigma0 = 1, sigma = 1, mu0 = 0, mu = (0, 1): log(1.001) * 2 + (1 + 0) / 2.001 + (1 + 1) / 2.001
    one = torch.ones(2, dtype=torch.float64)
    got = variational_kl(torch.tensor([0.0, 1.0], dtype=torch.float64), one, torch.zeros(2, dtype=torch.float64),
                         one, 1.0)
    assert got.item() == pytest.approx(2 * math.log(1.001) + 3 / 2.001, rel=1e-12)
    # sigma^2 = 10 sigma0^2: log(0.1 + 1e-3) < 0 -> clamped to exactly 0, with zero gradient
    sigma = torch.full((5,), math.sqrt(10) * 1e-5, dtype=torch.float64, requires_grad=True)
    clamped = variational_kl(torch.zeros(5, dtype=torch.float64), sigma, torch.zeros(5, dtype=torch.float64),
                             torch.full((5,), 1e-5, dtype=torch.float64), 1e-8)
    assert clamped.item() == 0.0
    (g,) = torch.autograd.grad(clamped, sigma)
    assert torch.all(g == 0)


def test_gaussian_kl_hand_value():
    from trainers.bcal_losses import gaussian_kl

    # element 1: N(0, 1) -> 0; element 2: 0.5 * (0.25 + 1 - 1 - log 0.25)
    got = gaussian_kl(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5]))
    assert got.item() == pytest.approx(0.5 * (0.25 + math.log(4.0)), rel=1e-6)


def test_irm_penalty_sum_and_mean_hand_values_and_gradient():
    from trainers.bcal_losses import irm_penalty

    # env 0: logits (2, 0), label 0 -> d/ds CE = (p0 - 1) * 2 = -2 / (e^2 + 1); env 1: logits (0, 0) -> 0
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]], requires_grad=True)
    term = (2.0 / (math.e ** 2 + 1)) ** 2
    pen = irm_penalty(logits, torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert pen.item() == pytest.approx(term, rel=1e-6)            # summed over the domains (official)
    mean = irm_penalty(logits, torch.tensor([0, 1]), torch.tensor([0, 1]), "mean")
    assert mean.item() == pytest.approx(term / 2, rel=1e-6)
    (g,) = torch.autograd.grad(pen, logits)
    assert g[0].abs().sum() > 0            # the penalty trains what produced the logits
    one_env = irm_penalty(logits, torch.tensor([0, 1]), torch.tensor([3, 3]))
    # one environment: grad = mean of the two samples' terms = -1 / (e^2 + 1)
    assert one_env.item() == pytest.approx((1.0 / (math.e ** 2 + 1)) ** 2, rel=1e-6)
    with pytest.raises(ValueError, match="sum"):
        irm_penalty(logits, torch.tensor([0, 1]), torch.tensor([0, 1]), "max")


def test_gradient_alignment_hand_value_and_graph():
    from trainers.bcal_losses import gradient_alignment

    feats = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.ones((), dtype=torch.float64, requires_grad=True)
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[4.0, 3.0], [0.0, 2.0]], dtype=torch.float64)
    loss_a, loss_b = (w * a * feats).sum(), (b * feats).sum()     # gradients a * w and b
    # row 0: (3*4 + 4*3) / ((5 + 1e-6) (5 + 1e-6)); row 1: orthogonal -> 0
    expect = (24.0 / (5.0 + 1e-6) ** 2) ** 2
    value, g_a, g_b = gradient_alignment(loss_a, loss_b, feats)
    assert value.item() == pytest.approx(expect, rel=1e-12)
    torch.testing.assert_close(g_a, a)
    torch.testing.assert_close(g_b, b)
    assert not value.requires_grad                  # official: taken without a graph, a constant
    value_g, _, _ = gradient_alignment(loss_a, loss_b, feats, create_graph=True)
    assert value_g.item() == pytest.approx(expect, rel=1e-12) and value_g.requires_grad


def test_total_loss_weights_the_parts_and_alignment_trains_only_when_asked():
    from trainers.bcal_losses import bcal_loss

    torch.manual_seed(1)
    raw = torch.randn(6, 4, dtype=torch.float64) * 3
    cls = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1).requires_grad_(True)
    dom = F.normalize(torch.randn(2, 4, dtype=torch.float64), dim=-1)
    labels, domains = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    img = raw / (raw.norm(dim=-1, keepdim=True) + 1e-6)          # official normalisation, + 1e-6
    kl = torch.tensor(0.25, dtype=torch.float64)
    parts = bcal_loss(raw, cls, dom, labels, domains, 10.0, (0.0, 0.0, 0.0), kl)
    assert parts.total.item() == pytest.approx(F.cross_entropy(10 * img @ cls.t(), labels).item() + 0.25, rel=1e-12)
    assert parts.ce_domain.item() == pytest.approx(F.cross_entropy(10 * img @ dom.t(), domains).item(), rel=1e-12)
    w = bcal_loss(raw, cls, dom, labels, domains, 10.0, (0.1, 2.0, 3.0), kl)
    expect = w.ce + 0.1 * w.ce_domain + 2.0 * w.irm + 3.0 * w.align + 0.25
    assert w.total.item() == pytest.approx(expect.item(), rel=1e-12) and w.irm > 0 and w.align > 0
    # the alignment term shifts the value but gives no gradient, unless ALIGN_GRAD
    (g_total,) = torch.autograd.grad(w.total, cls, retain_graph=True)
    (g_rest,) = torch.autograd.grad(w.ce + 0.1 * w.ce_domain + 2.0 * w.irm, cls, retain_graph=True)
    torch.testing.assert_close(g_total, g_rest, rtol=1e-12, atol=1e-14)
    wg = bcal_loss(raw, cls, dom, labels, domains, 10.0, (0.1, 2.0, 3.0), kl, align_grad=True)
    assert wg.total.item() == pytest.approx(w.total.item(), rel=1e-12)
    (g_diff,) = torch.autograd.grad(wg.total, cls)
    assert (g_diff - g_total).abs().max() > 1e-3


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
        # official behaviour (BASELINES.md 5.6 / 7.6); every other value is a named fix
        assert (c.IRM_REDUCTION, c.ALIGN_GRAD, c.KL_PRIOR, c.EVAL_NOISE) == ("sum", False, "init", True)


def test_named_fixes_are_protocol_switches():
    from dassl.engine.protocol import SWITCHES, protocol_block

    official = {"TRAINER.BCAL.IRM_REDUCTION": "sum", "TRAINER.BCAL.ALIGN_GRAD": False,
                "TRAINER.BCAL.KL_PRIOR": "init", "TRAINER.BCAL.EVAL_NOISE": True}
    assert {k: SWITCHES[k] for k in official} == official
    cfg = {"TRAINER": {"BCAL": {"IRM_REDUCTION": "mean", "ALIGN_GRAD": False, "KL_PRIOR": "standard",
                                "EVAL_NOISE": False}}}
    block = protocol_block(cfg)
    assert {"TRAINER.BCAL.IRM_REDUCTION", "TRAINER.BCAL.KL_PRIOR", "TRAINER.BCAL.EVAL_NOISE"} <= set(block["fixed"])
    assert "TRAINER.BCAL.ALIGN_GRAD" not in block["fixed"]


def test_trainer_builds_two_variational_learners(data_root, tmp_path):
    tr = build(data_root, tmp_path / "o")
    assert tr.domain_names == list(DEFAULT_DOMAINS)
    # two registered learners, each with its own optimiser and scheduler (official)
    assert tr.get_model_names() == ["prompt_learner", "prompt_learner_context"]
    cat, ctx = tr._models["prompt_learner"], tr._models["prompt_learner_context"]
    assert tr._optims["prompt_learner"] is not tr._optims["prompt_learner_context"]
    assert [p for g in tr._optims["prompt_learner_context"].param_groups for p in g["params"]] == \
        [ctx.ctx, ctx.ctx_sigma]
    assert tr._scheds["prompt_learner"] is not tr._scheds["prompt_learner_context"]
    assert cat.n_cls == tr.num_classes and ctx.n_cls == 4
    assert cat.ctx.shape == (16, 32) and abs(cat.ctx.std().item() - 0.02) < 0.004
    assert torch.all(ctx.ctx_sigma == 1e-5)
    assert tr.prec == "fp32"  # CPU
    # the KL prior is a copy of the initial context (not an alias, not saved)
    assert torch.equal(cat.ctx_prior, cat.ctx) and cat.ctx_prior.data_ptr() != cat.ctx.data_ptr()
    assert "ctx_prior" not in cat.state_dict() and "sigma_prior" not in cat.state_dict()
    # every forward samples ctx + sigma^2 * eps; context(False) is the mean
    cat.ctx_sigma.data.fill_(1.0)
    torch.testing.assert_close(cat.context(False), cat.ctx)
    assert not torch.allclose(cat.context(True), cat.ctx)
    eps = torch.full_like(cat.ctx, 0.5)
    cat.noise_source = lambda like: eps
    torch.testing.assert_close(cat.context(True), cat.ctx + 0.5)


def _step(tr, batch, n=1):
    tr.set_model_mode("train")
    tr.batch_idx, tr.num_batches = 0, 10 ** 9
    return [tr.forward_backward(batch) for _ in range(n)]


def test_training_lowers_the_loss_and_trains_both_learners(data_root, tmp_path):
    tr = build(data_root, tmp_path / "o", extra=["OPTIM.NAME", "adam", "OPTIM.LR", "0.02", "OPTIM.WEIGHT_DECAY", "0"])
    batch = next(iter(tr.train_loader_x))
    assert len(set(batch["domain"].tolist())) > 1
    before = {(m, k): v.clone() for m in tr.get_model_names() for k, v in tr._models[m].state_dict().items()}
    prior = tr._models["prompt_learner"].ctx_prior.clone()
    clip_before = {k: v.clone() for k, v in tr.clip_model.state_dict().items()}
    outs = _step(tr, batch, 12)
    assert outs[-1]["loss_ce"] < outs[0]["loss_ce"] and outs[-1]["loss"] < outs[0]["loss"]
    assert all(math.isfinite(o["irm"]) and o["align"] >= 0 and o["kl"] >= 0 for o in outs)
    for k, v in tr.clip_model.state_dict().items():
        assert torch.equal(v, clip_before[k]), k
    changed = {(m, k) for m in tr.get_model_names() for k, v in tr._models[m].state_dict().items()
               if not torch.equal(v, before[(m, k)])}
    assert {(m, k) for m in tr.get_model_names() for k in ("ctx", "ctx_sigma")} <= changed
    assert not any("token_" in k for _, k in changed)
    assert torch.equal(tr._models["prompt_learner"].ctx_prior, prior)     # the prior stays the initial context


def _loss_parts(tr, batch):
    """The loss of one batch with replayed (zero) noise, without stepping."""
    image, label = tr.parse_batch_train(batch)
    raw = tr.raw_image_features(image, batch)
    return tr.compute_loss(raw, label, batch["domain"])


@pytest.mark.parametrize("key,value,expect", [
    ("TRAINER.BCAL.IRM_REDUCTION", "mean", "irm_mean"),
    ("TRAINER.BCAL.KL_PRIOR", "standard", "kl_standard"),
])
def test_named_fixes_change_what_they_name(key, value, expect, data_root, tmp_path):
    from trainers.bcal_losses import gaussian_kl

    off, on = build(data_root, tmp_path / "a"), build(data_root, tmp_path / "b", extra=[key, value])
    batch = next(iter(off.train_loader_x))
    for tr in (off, on):
        for learner in tr.prompts.category, tr.prompts.context:
            learner.noise_source = torch.zeros_like
    a, b = _loss_parts(off, batch), _loss_parts(on, batch)
    n_dom = len(set(batch["domain"].tolist()))
    if expect == "irm_mean":
        assert n_dom > 1 and b.irm.item() == pytest.approx(a.irm.item() / n_dom, rel=1e-5)
        assert b.kl.item() == pytest.approx(a.kl.item(), rel=1e-5)
    else:
        n = 2 * 16 * 32                          # both learners' elements
        # standard: 1e-8 * 0.5 * sum(sigma^4 + mu^2 - 1 - log sigma^4); init at build: 1e-8 * n * log(1.001)
        mu = torch.cat([on.prompts.category.ctx.detach(), on.prompts.context.ctx.detach()])
        hand = 1e-8 * gaussian_kl(mu.double(), torch.full_like(mu, 1e-10, dtype=torch.float64)).item()
        assert b.kl.item() == pytest.approx(hand, rel=1e-5)
        assert a.kl.item() == pytest.approx(1e-8 * n * math.log(1.001), rel=1e-4)


def test_evaluation_samples_the_contexts_unless_named_fix(data_root, tmp_path):
    on, off = build(data_root, tmp_path / "a"), build(data_root, tmp_path / "b",
                                                      extra=["TRAINER.BCAL.EVAL_NOISE", "False"])
    batch = next(iter(on.test_loader))
    for tr in (on, off):
        tr.set_model_mode("eval")
        for learner in tr.prompts.category, tr.prompts.context:
            learner.ctx_sigma.data.fill_(0.3)             # visible noise sigma^2 = 0.09
    with torch.no_grad():
        o1, o2 = on.model_inference(batch["img"]), on.model_inference(batch["img"])
        f1, f2 = off.model_inference(batch["img"]), off.model_inference(batch["img"])
    assert not torch.allclose(o1.logits, o2.logits)
    torch.testing.assert_close(f1.logits, f2.logits, rtol=0, atol=0)
    assert f1.extras["context_logits"].shape == (len(batch["img"]), 4)
    torch.testing.assert_close(f1.score, torch.logsumexp(f1.logits, dim=1))
    # with the noise replayed as zeros, the official path gives the posterior-mean logits
    for learner in on.prompts.category, on.prompts.context:
        learner.noise_source = torch.zeros_like
    with torch.no_grad():
        torch.testing.assert_close(on.model_inference(batch["img"]).logits, f1.logits)


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
                                       ("TRAINER.BCAL.PREC", "fp8"), ("TRAINER.BCAL.CSC", "True"),
                                       ("TRAINER.BCAL.IRM_REDUCTION", "max"), ("TRAINER.BCAL.KL_PRIOR", "normal"),
                                       ("TRAINER.BCAL.ALIGN_GRAD", "1"), ("TRAINER.BCAL.EVAL_NOISE", "yes")])
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
    for name in ("prompt_learner", "prompt_learner_context"):       # the official checkpoint layout
        sd = torch.load(os.path.join(out, name, "model.pth.tar-1"), weights_only=False)["state_dict"]
        assert {"ctx", "ctx_sigma"} <= set(sd) and "ctx_prior" not in sd
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
    z = np.load(os.path.join(ev, "scores.npz"))      # the context logits over the 4 domain names
    assert z["ood_test__extra_context_logits"].shape == (len(z["ood_test__logits"]), 4)


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
