"""The CRoFT trainer: config -> options, golden parity through the real trainer wiring, learning, checkpoints."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import COOP, TINY, assert_ood_matches_scores, cli_args, load_fixture, run_cli
from synthetic import write_lodo_tree
from synthetic_openset import write_all_openset

# the fixture's EDR reduction -> the CRoFT semantics row that selects it ("auto": PACS -> setup2, VLCS -> setup2_vlcs)
SEMANTICS_OF = {"mean_of_squares_of_grad_of_sum": "setup1", "sum_of_squares_of_grad_of_mean": "auto"}
CONFIGS = {"rn50_ep30.yaml": "configs/trainers/CRoFT/rn50_ep30.yaml",
           "ViT_ep30.yaml": "configs/trainers/CRoFT/ViT_ep30.yaml"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("croft_data")
    write_lodo_tree(str(root), per_class=8)
    write_lodo_tree(str(root), folder="VLCS", domains=("CALTECH", "LABELME", "PASCAL", "SUN"), per_class=4)
    write_all_openset(str(root))
    return str(root)


def build(data_root, dataset="PACS", config="configs/trainers/CRoFT/rn50_ep30.yaml", extra=()):
    import train
    from dassl.engine import build_trainer

    env = "sketch" if dataset.startswith("PACS") else "sun"
    cwd = os.getcwd()
    os.chdir(COOP)
    try:
        args = train.get_parser().parse_args([
            "--root", data_root, "--trainer", "CRoFT", "--dataset-config-file", f"configs/datasets/{dataset}.yaml",
            "--config-file", config, "--seed", "1", *TINY, "TEST_ENV", env, "VERBOSE", "False", *extra])
        cfg = train.setup_cfg(args)
        return build_trainer(cfg)
    finally:
        os.chdir(cwd)


def test_dataset_configs_select_official_semantics(data_root):
    pacs = build(data_root, "PACS", extra=["TRAINER.CRoFT.gen_step", "1"])
    assert pacs.opts.effective_branch == "A" and pacs.opts.edr_reduction == "mean_sumsq"
    vlcs = build(data_root, "VLCS", extra=["TRAINER.CRoFT.gen_step", "5"])
    assert vlcs.opts.effective_branch == "B"       # the official code never feeds Cg to EDR on VLCS
    g0 = build(data_root, "PACS", extra=["TRAINER.CRoFT.gen_step", "0"])
    assert g0.opts.effective_branch == "B"
    ens = build(data_root, "PACS", extra=["TRAINER.CRoFT.SEMANTICS", "setup1"])
    assert torch.allclose(ens.text_feats.norm(dim=-1), torch.ones(3), atol=1e-5)   # ensemble is unit-norm
    assert ens.opts.edr_reduction == "sum_meansq"
    assert sorted(pacs.get_model_names()) == ["clip_adapter", "generator"]
    fixed = build(data_root, "PACS", config="configs/trainers/CRoFT/rn50_ep30_fixed.yaml")
    o = fixed.opts
    assert o.fix_edr_consistent and o.fix_separate_updates and o.fix_fresh_activations and o.fix_edr_temperature
    assert fixed.cfg.OPTIM.WEIGHT_DECAY == 5e-4 and fixed.cfg.DATALOADER.OOD_TEST.TRANSFORM == "test"


TRAINER_CASES = ["pacs_g0", "pacs_vit_g1", "vlcs_g5", "in46_g1"]  # in46_1shot_g10 (10 generator steps): core test


def test_fixture_has_the_trainer_cases():
    fx = load_fixture()
    assert set(TRAINER_CASES) <= {str(c) for c in fx["meta__case_keys"]}


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\(\)`")
@pytest.mark.parametrize("case", TRAINER_CASES)
def test_trainer_reproduces_golden_updates(data_root, case):
    """The real trainer (config-built optimisers, schedulers, forward_backward) replays the fixture in float32."""
    from trainers.croft_core import Adapter, OODImgGen
    from dassl.optim import build_lr_scheduler, build_optimizer

    fx = load_fixture()
    g = lambda n: fx[f"{case}__{n}"]  # noqa: E731
    dataset = "VLCS" if str(g("dataset_name")) == "VLCS" else "PACS"
    extra = ["TRAINER.CRoFT.gen_step", str(int(g("gen_step"))), "TRAINER.CRoFT.lambda1", str(float(g("lambda1"))),
             "TRAINER.CRoFT.lambda2", str(float(g("lambda2"))), "TRAINER.CRoFT.ratio", str(float(g("ratio"))),
             "TRAINER.CRoFT.ratio_text", str(float(g("ratio_text"))),
             "TRAINER.CRoFT.SEMANTICS", SEMANTICS_OF[str(g("l2_reduction"))]]
    tr = build(data_root, dataset, CONFIGS[str(g("trainer_config"))], extra)
    assert tr.opts.effective_branch == str(g("edr_branch"))
    D = g("T").shape[1]
    # swap in fixture-sized heads, built exactly as build_model does
    tr.adapter, tr.generator = Adapter(D), OODImgGen(D)
    tr.optim, tr.optim_gen = build_optimizer(tr.adapter, tr.cfg.OPTIM), build_optimizer(tr.generator, tr.cfg.OPTIM)
    tr.sched, tr.sched_gen = build_lr_scheduler(tr.optim, tr.cfg.OPTIM), build_lr_scheduler(tr.optim_gen, tr.cfg.OPTIM)
    tr._models.update(clip_adapter=tr.adapter, generator=tr.generator)
    tr._optims.update(clip_adapter=tr.optim, generator=tr.optim_gen)
    tr._scheds.update(clip_adapter=tr.sched, generator=tr.sched_gen)
    tr.text_feats = torch.tensor(g("T"), dtype=torch.float32)
    tr.logit_scale = float(g("s"))
    xs = torch.tensor(g("X_train"), dtype=torch.float32)
    tr.feature_provider = lambda images, batch: xs[batch["index"]]
    tr.update_lr()                       # end of the warm-up epoch, as in the fixture harness
    assert tr.get_current_lr() == pytest.approx(float(g("lr_used")[0]))
    n_iter, n_batch = g("X_train").shape[:2]   # every size from the fixture
    tr.num_batches, tr.epoch = n_iter, 1
    for it in range(n_iter):
        tr.batch_idx = it
        batch = {"img": torch.zeros(n_batch, 3, 2, 2), "label": torch.tensor(g("y_train")[it]), "index": it}
        tr.forward_backward(batch)
        for name, param in (("fc_i", tr.adapter.fc_i), ("fc_t", tr.adapter.fc_t),
                            ("img2img_cov", tr.generator.img2img_cov)):
            ref = g(name)[it]
            err = np.abs(param.detach().numpy() - ref).max() / np.abs(ref).max()
            assert err < 1e-5, (case, it, name, err)
    assert tr.get_current_lr() == pytest.approx(float(g("lr_after")))   # schedulers stepped after the epoch
    xe = torch.tensor(g("X_eval"), dtype=torch.float32)
    tr.feature_provider = lambda images, batch: xe
    with torch.no_grad():
        out = tr.model_inference(torch.zeros(1))   # the feature provider ignores the images
    logits, score = out.logits, out.score
    np.testing.assert_allclose(logits.numpy(), g("eval_logits_final"), rtol=0, atol=2e-3)
    np.testing.assert_allclose(score.numpy(), g("eval_score_final"), rtol=0, atol=2e-3)
    assert out.features.shape == out.extras["img_zs"].shape == xe.shape


def test_short_training_learns_and_moves_all_matrices(data_root):
    tr = build(data_root, "PACS", extra=["TRAINER.CRoFT.gen_step", "1", "TRAINER.CRoFT.lambda2", "1",
                                         "OPTIM.LR", "0.05", "OPTIM.WEIGHT_DECAY", "5e-4", "OPTIM.WARMUP_EPOCH", "0"])
    torch.manual_seed(0)
    # a separable task on fixed features: class-dependent directions
    D = tr.text_feats.shape[1]
    C = tr.num_classes
    protos = torch.randn(C, D)
    tr.text_feats = protos + 3.0 * torch.randn(C, D)   # noisy text prototypes: zero-shot is imperfect
    y_all = torch.arange(C).repeat(16)
    x_all = protos[y_all] + 0.8 * torch.randn(len(y_all), D)
    tr.feature_provider = lambda images, batch: x_all[batch["index"]]
    init = {k: v.detach().clone() for k, v in {**tr.adapter.state_dict(), **tr.generator.state_dict()}.items()}

    def acc():
        with torch.no_grad():
            logits = tr.model_inference(torch.zeros(1)).logits
        return (logits.argmax(1) == y_all[torch.arange(len(y_all))]).float().mean().item()

    tr.feature_provider = lambda images, batch: x_all if batch is None else x_all[batch["index"]]
    before = acc()
    tr.num_batches, tr.epoch = 6, 0
    for step in range(60):
        idx = torch.randperm(len(y_all))[:8]
        tr.batch_idx = step % 6
        tr.forward_backward({"img": torch.zeros(8), "label": y_all[idx], "index": idx})
    after = acc()
    assert before < 0.9 and after > before + 0.05, (before, after)
    state = {**tr.adapter.state_dict(), **tr.generator.state_dict()}
    for k in ("fc_i", "fc_t", "img2img_cov"):
        assert not torch.allclose(state[k], init[k]), k


def test_train_then_eval_only_open_set_record(data_root, tmp_path):
    out = str(tmp_path / "train")
    extra = ["OPTIM.MAX_EPOCH", "2", "DATASET.NUM_SHOTS", "4", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
             "TRAINER.CRoFT.gen_step", "1"]
    rec = run_cli(cli_args(data_root, out, "CRoFT", extra=extra))
    assert rec["mode"] == "train" and "accuracy" in rec["metrics"]["test"]
    for name in ("clip_adapter", "generator"):
        assert os.path.isfile(os.path.join(out, name, "model-best.pth.tar"))
        assert os.path.isfile(os.path.join(out, name, "model.pth.tar-2"))
    ev1 = run_cli(cli_args(data_root, str(tmp_path / "ev1"), "CRoFT", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                           flags=["--eval-only", "--model-dir", out],
                           extra=["DATALOADER.OOD_TEST.TRANSFORM", "test"]))
    ev2 = run_cli(cli_args(data_root, str(tmp_path / "ev2"), "CRoFT", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                           flags=["--eval-only", "--model-dir", out],
                           extra=["DATALOADER.OOD_TEST.TRANSFORM", "test"]))
    m = ev1["metrics"]
    assert "accuracy" in m["test"]
    assert_ood_matches_scores(str(tmp_path / "ev1"), ev1)
    assert os.path.getsize(tmp_path / "ev1" / "energy_hist.png") > 1000
    # checkpoint round trip: two evaluations of the same checkpoint give identical outputs (bitwise: same process,
    # same batches)
    z1, z2 = np.load(tmp_path / "ev1" / "scores.npz"), np.load(tmp_path / "ev2" / "scores.npz")
    for key in ("test__logits", "ood_test__score_energy", "val__features"):
        np.testing.assert_array_equal(z1[key], z2[key])
    assert ev1["metrics"]["ood"] == ev2["metrics"]["ood"]
    # loading the checkpoint reproduces the final test accuracy of the training run
    ev3 = run_cli(cli_args(data_root, str(tmp_path / "ev3"), "CRoFT", flags=["--eval-only", "--model-dir", out]))
    assert ev3["metrics"]["test"]["accuracy"] == rec["metrics"]["test"]["accuracy"]


def test_official_open_set_transform_is_random(data_root, tmp_path):
    """Fidelity: by default open-set images get the training transform (random crops), like the official code."""
    outs = []
    for i in range(2):
        rec = run_cli(cli_args(data_root, str(tmp_path / f"zs{i}"), "ZeroshotCLIP",
                               dataset_cfg="configs/datasets/PACS_DTD.yaml", flags=["--eval-only"], seed=i))
        outs.append(np.load(tmp_path / f"zs{i}" / "scores.npz")["ood_test__score_energy"])
        assert rec["metrics"]["ood"]["energy"]["num_ood"] > 0
    assert not np.array_equal(outs[0], outs[1])
