"""Prompt-learning baselines (CoOp, CoCoOp, DPLCLIP) on the tiny random CLIP and synthetic PACS trees."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from dassl.engine.inference import InferenceOutput
from helpers import COOP, assert_logged_accuracy, assert_ood_matches_scores, cli_args, run_cli
from synthetic import write_lodo_tree

NAMES = ("CoOp", "CoCoOp", "DPLCLIP")
NODES = {"CoOp": "COOP", "CoCoOp": "COCOOP", "DPLCLIP": "DPLCLIP", "BCAL": "BCAL"}
MODEL_NAMES = {"CoOp": "prompt_learner", "CoCoOp": "prompt_learner", "DPLCLIP": "DPL", "BCAL": "prompt_learner"}
FAST = ["OPTIM.WARMUP_EPOCH", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8"]

try:
    import datasets.openset  # noqa: F401
    from synthetic_openset import write_dtd_like
    HAVE_OPENSET = True
except ImportError:  # the open-set datasets are another module; without it only closed-set eval is tested
    HAVE_OPENSET = False


def config(name: str, backbone: str = "rn50") -> str:
    return f"configs/trainers/{name}/{backbone}_ep30.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_lodo_tree(root, per_class=4)
    if HAVE_OPENSET:
        write_dtd_like(root)
    return root


@pytest.fixture(scope="module")
def tiny_clip():
    from clip_backbone import load_clip

    torch.manual_seed(0)
    return load_clip("tiny-rn-test", "random")


def build(root, out, name, extra=(), seed=1):
    """A trainer object configured as ``train.py`` would configure it."""
    import train
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed

    args = cli_args(root, str(out), name, config=os.path.join(COOP, config(name)), extra=FAST + list(extra),
                    seed=seed, dataset_cfg=os.path.join(COOP, "configs/datasets/PACS.yaml"))
    cfg = train.setup_cfg(train.get_parser().parse_args(args))
    set_random_seed(cfg.SEED)
    return build_trainer(cfg)


def infer(tr, batch):
    tr.set_model_mode("eval")
    inp, _ = tr.parse_batch_test(batch)
    with torch.no_grad():
        out = tr.model_inference(inp)
    assert isinstance(out, InferenceOutput) and out.features is not None
    return out.logits, out.features, out.score


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", NAMES)
def test_configs_and_defaults(name):
    import train
    from dassl.config import get_cfg_default

    for backbone, model, batch in (("rn50", "RN50", 32), ("ViT", "ViT-B/16", 4 if name == "CoCoOp" else 32)):
        cfg = get_cfg_default()
        train.extend_cfg(cfg)
        cfg.merge_from_file(os.path.join(COOP, config(name, backbone)))
        assert cfg.MODEL.BACKBONE.NAME == model and cfg.DATALOADER.TRAIN_X.BATCH_SIZE == batch
        assert cfg.OPTIM.LR == 0.002 and cfg.OPTIM.MAX_EPOCH == 30 and cfg.OPTIM.LR_SCHEDULER == "cosine"
        assert (cfg.OPTIM.WARMUP_EPOCH, cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_CONS_LR) == (1, "constant", 1e-5)
        assert cfg.DATALOADER.TEST.BATCH_SIZE == 100 and cfg.INPUT.INTERPOLATION == "bicubic"
        node = cfg.TRAINER[NODES[name]]
        assert node.PREC == "fp16" and node.N_CTX == 16
    assert (cfg.TRAINER.COOP.CTX_INIT, cfg.TRAINER.COOP.CSC, cfg.TRAINER.COOP.CLASS_TOKEN_POSITION) == ("", False,
                                                                                                        "end")
    d = cfg.TRAINER.DPLCLIP
    assert (d.MLP_DEPTH, d.MLP_WIDTH, d.MLP_DROPOUT) == (3, 512, 0.1)


# ------------------------------------------------------------------ text paths
@pytest.mark.parametrize("position,text", [("end", "a photo of a {}."), ("middle", "a photo {} of a."),
                                           ("front", "{} a photo of a.")])
def test_coop_text_path_reproduces_encode_text(tiny_clip, position, text):
    """Context initialised from "a photo of a" = CLIP's own encoding of the plain prompt."""
    from clip_backbone import TextEncoder, tokenize
    from trainers.prompting import PromptLearner, encode_prompt_embeddings

    classnames = ["dog", "guitar", "ice_cream"]
    model, ctx_len = tiny_clip.model, tiny_clip.context_length
    pl = PromptLearner(model, ctx_len, classnames, n_ctx=16, ctx_init="a photo of a",
                       class_token_position=position)
    assert pl.n_ctx == 4 and pl.ctx.shape == (4, model.token_embedding.weight.shape[1])
    got = encode_prompt_embeddings(TextEncoder(model), pl(), pl.tokenized_prompts)
    with torch.no_grad():
        ref = model.encode_text(tokenize([text.format(c.replace("_", " ")) for c in classnames], ctx_len)).float()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert set(pl.state_dict()) == {"ctx", "token_prefix", "token_suffix"}


def test_coop_random_and_class_specific_context(tiny_clip):
    from trainers.prompting import PromptLearner

    torch.manual_seed(0)
    pl = PromptLearner(tiny_clip.model, tiny_clip.context_length, ["dog", "cat"], n_ctx=16)
    assert pl.ctx.shape == (16, 32) and abs(pl.ctx.std().item() - 0.02) < 0.003
    assert pl().shape == (2, tiny_clip.context_length, 32)
    csc = PromptLearner(tiny_clip.model, tiny_clip.context_length, ["dog", "cat"], n_ctx=8, csc=True)
    assert csc.ctx.shape == (2, 8, 32) and not torch.equal(csc.ctx[0], csc.ctx[1])
    prompts = csc()
    torch.testing.assert_close(prompts[:, 1:9], csc.ctx.detach(), rtol=0, atol=0)


def test_cocoop_zero_bias_is_the_plain_prompt(tiny_clip):
    """With a zero meta-net output every image gets CLIP's encoding of "a photo of a {class}."."""
    from clip_backbone import TextEncoder, tokenize
    from trainers.cocoop import CoCoOpPromptLearner
    from trainers.prompting import encode_prompt_embeddings

    classnames = ["dog", "elephant", "giraffe"]
    model, ctx_len = tiny_clip.model, tiny_clip.context_length
    pl = CoCoOpPromptLearner(model, ctx_len, classnames, ctx_init="a photo of a")
    assert pl.meta_net.linear1.out_features == 32 // 16 and pl.meta_net.linear2.out_features == 32
    torch.nn.init.zeros_(pl.meta_net.linear2.weight)
    torch.nn.init.zeros_(pl.meta_net.linear2.bias)
    feats = F.normalize(torch.randn(5, 32), dim=-1)
    got = encode_prompt_embeddings(TextEncoder(model), pl(feats), pl.tokenized_prompts)
    assert got.shape == (5, 3, 32)
    with torch.no_grad():
        ref = model.encode_text(tokenize([f"a photo of a {c}." for c in classnames], ctx_len)).float()
    torch.testing.assert_close(got, ref.expand(5, -1, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["mean_of_mlp", "mlp_of_mean"])
def test_dplclip_scores_each_image_against_its_own_domain_group(pool, data_root, tmp_path):
    tr = build(data_root, tmp_path / "o", "DPLCLIP", extra=["TRAINER.DPLCLIP.DOMAIN_POOL", pool,
                                                            "TRAINER.DPLCLIP.LOGITS", "per_group"])
    tr.set_model_mode("eval")
    feats = F.normalize(torch.randn(7, 32), dim=-1)
    raw = 3 * feats
    domains = torch.tensor([2, 0, 2, 1, 0, 2, 1])
    with torch.no_grad():
        logits = tr.forward_logits(feats, raw, domains)
        assert logits.shape == (7, tr.num_classes)
        for d in (0, 1, 2):
            idx = (domains == d).nonzero().flatten()
            alone = tr.forward_logits(feats[idx], raw[idx], None)
            torch.testing.assert_close(logits[idx], alone, rtol=1e-5, atol=1e-5)
        # the official concatenation would give 7 x (3 * C) logits; and group tokens really differ
        tokens = tr.domain_tokens(feats, raw, torch.unique(domains, return_inverse=True)[1], 3)
    assert tokens.shape == (3, 16, 32) and not torch.allclose(tokens[0], tokens[1])
    assert set(tr._models) == {"DPL"} and not any("token" in k for k in tr._models["DPL"].state_dict())


def test_dplclip_official_concat_logits(data_root, tmp_path):
    """Official default: every image against all groups' classes (N x G*C), cross-entropy labels 0..C-1."""
    tr = build(data_root, tmp_path / "o", "DPLCLIP", extra=["TRAINER.DPLCLIP.MLP_DROPOUT", "0"])
    assert tr.cfg.TRAINER.DPLCLIP.LOGITS == "concat"
    fix = build(data_root, tmp_path / "p", "DPLCLIP", extra=["TRAINER.DPLCLIP.MLP_DROPOUT", "0",
                                                             "TRAINER.DPLCLIP.LOGITS", "per_group"])
    fix.mlp.load_state_dict(tr.mlp.state_dict())
    feats = F.normalize(torch.randn(7, 32), dim=-1)
    raw = 3 * feats
    domains = torch.tensor([2, 0, 2, 1, 0, 2, 1])
    C = tr.num_classes
    with torch.no_grad():
        logits = tr.forward_logits(feats, raw, domains)
        own = fix.forward_logits(feats, raw, domains)
        assert logits.shape == (7, 3 * C)
        for n, d in enumerate(domains.tolist()):   # block g of row n = row n scored against group g's classes
            torch.testing.assert_close(logits[n, d * C:(d + 1) * C], own[n], rtol=1e-5, atol=1e-5)
        one = domains.new_zeros(7)
        torch.testing.assert_close(tr.forward_logits(feats, raw, one), fix.forward_logits(feats, raw, one))
    # training: the loss is the cross-entropy of the N x G*C logits against labels 0..C-1
    batch = next(iter(tr.train_loader_x))
    assert len(set(batch["domain"].tolist())) > 1
    tr.feature_provider = separable_provider(tr, batch)
    tr.set_model_mode("train")
    with torch.no_grad():
        f, r = tr.image_features(batch["img"], batch)
        expect = F.cross_entropy(tr.forward_logits(f, r, batch["domain"]), batch["label"]).item()
    tr.batch_idx, tr.num_batches = 0, 10 ** 9
    assert tr.forward_backward(batch)["loss"] == pytest.approx(expect, rel=1e-5)


def test_ragged_logits_are_padded_with_minus_inf(data_root, tmp_path):
    """Val batches with different numbers of domains give different widths; padding keeps energy and argmax."""
    import numpy as np

    from dassl.engine.ragged import cat_padded

    a, b = torch.tensor([[1.0, 2.0, 3.0, 0.5]]), torch.tensor([[-1.0, -2.0]])
    got = cat_padded([a, b])
    assert got.shape == (2, 4) and torch.isneginf(got[1, 2:]).all()
    assert torch.logsumexp(got[1], 0).item() == pytest.approx(math.log(math.exp(-1) + math.exp(-2)), rel=1e-6)
    tr = build(data_root, tmp_path / "o", "DPLCLIP", extra=["DATALOADER.TEST.BATCH_SIZE", "4"])
    out = tr.collect_outputs("val")
    widths = {int(np.isfinite(row).sum()) for row in out["logits"]}
    assert out["logits"].shape[1] == max(widths) and len(widths) > 1
    np.testing.assert_allclose(out["score"], torch.logsumexp(torch.from_numpy(out["logits"]), 1).numpy(),
                               rtol=1e-5)


def test_domain_match_substring_merges_upper_case_vlcs(tmp_path):
    """Official substring matching: upper-case VLCS folders all become 'sun'; ``folder`` keeps the four."""
    import train
    from dassl.data.datasets import DATASET_REGISTRY

    root = str(tmp_path)
    write_lodo_tree(root, folder="VLCS", domains=("CALTECH", "LABELME", "PASCAL", "SUN"), classes=("bird", "car"),
                    per_class=2)
    write_lodo_tree(root, folder="PACS", per_class=2)
    seen = {}
    for match in ("substring", "folder"):
        for name, env in (("VLCS", "SUN"), ("PACS", "sketch")):
            args = cli_args(root, str(tmp_path / "o"), "CoOp", config=os.path.join(COOP, config("CoOp")),
                            dataset_cfg=os.path.join(COOP, f"configs/datasets/{name}.yaml"),
                            extra=["DATASET.DOMAIN_MATCH", match])
            args[args.index("TEST_ENV") + 1] = env
            ds = DATASET_REGISTRY.get(name)(train.setup_cfg(train.get_parser().parse_args(args)))
            seen[match, name] = sorted({(d.domain, d.domainname) for d in ds.train_x + ds.val})
    assert seen["substring", "VLCS"] == [(3, "sun")]
    assert seen["folder", "VLCS"] == [(0, "caltech"), (1, "labelme"), (2, "pascal")]
    assert seen["substring", "PACS"] == seen["folder", "PACS"] == [(0, "art_painting"), (1, "cartoon"), (2, "photo")]


# ------------------------------------------------------------------ optimisation
def separable_provider(tr, batch):
    """Frozen-feature stand-in: images of class c sit near CLIP's (centred) text feature of class c."""
    from clip_backbone import tokenize

    names = tr.dm.dataset.classnames
    with torch.no_grad():
        t = tr.clip_model.encode_text(tokenize([f"a photo of a {c}." for c in names], tr.context_length)).float()
    t = F.normalize(t, dim=-1)
    protos = F.normalize(t - t.mean(0), dim=-1)
    gen = torch.Generator().manual_seed(0)
    noise = 0.05 * torch.randn(len(batch["label"]), protos.shape[1], generator=gen)
    return lambda images, b: protos[b["label"]] + noise[: len(b["label"])]


@pytest.mark.parametrize("name", NAMES)
def test_training_steps_lower_the_loss_and_touch_only_the_prompt_module(name, data_root, tmp_path):
    tr = build(data_root, tmp_path / "o", name, extra=["OPTIM.NAME", "adam", "OPTIM.LR", "0.02",
                                                       "OPTIM.WEIGHT_DECAY", "0"])
    batch = next(iter(tr.train_loader_x))
    tr.feature_provider = separable_provider(tr, batch)
    module = tr._models[MODEL_NAMES[name]]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    clip_before = {k: v.clone() for k, v in tr.clip_model.state_dict().items()}
    tr.set_model_mode("train")
    tr.batch_idx, tr.num_batches = 0, 10 ** 9
    losses = [tr.forward_backward(batch)["loss"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(not p.requires_grad for p in tr.clip_model.parameters())
    for k, v in tr.clip_model.state_dict().items():
        assert torch.equal(v, clip_before[k]), k
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not any(k.startswith("token_") for k in changed)


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_save_reload_gives_identical_eval_outputs(name, data_root, tmp_path):
    tr = build(data_root, tmp_path / "a", name, extra=["OPTIM.NAME", "adam", "OPTIM.LR", "0.02"])
    tr.set_model_mode("train")
    tr.batch_idx, tr.num_batches = 0, 10 ** 9
    train_batch = next(iter(tr.train_loader_x))
    for _ in range(2):
        tr.forward_backward(train_batch)
    batch = next(iter(tr.val_loader))          # source domains: DPLCLIP groups by domain here
    ref = infer(tr, batch)
    groups = len(set(batch["domain"].tolist())) if name == "DPLCLIP" else 1   # official concatenated logits
    assert ref[0].shape == (len(batch["label"]), groups * tr.num_classes)
    torch.testing.assert_close(ref[2], torch.logsumexp(ref[0], dim=1))
    torch.testing.assert_close(ref[1].norm(dim=1), torch.ones(len(batch["label"])))
    tr.save_model(0, str(tmp_path / "ckpt"))
    sd = torch.load(tmp_path / "ckpt" / MODEL_NAMES[name] / "model.pth.tar-1", weights_only=False)["state_dict"]
    assert ("token_prefix" in sd) == (name != "DPLCLIP") and "tokenized_prompts" not in sd
    fresh = build(data_root, tmp_path / "b", name)  # same seed: same random CLIP, untrained prompt module
    assert not torch.equal(infer(fresh, batch)[0], ref[0])
    fresh.load_model(str(tmp_path / "ckpt"), epoch=1)
    for a, b in zip(ref, infer(fresh, batch)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize("name,prec", [("CoOp", "fp16"), ("CoOp", "bf16"), ("CoCoOp", "amp"), ("DPLCLIP", "bf16"),
                                       ("DPLCLIP", "amp")])
def test_reduced_precision_on_cpu_runs_in_fp32(name, prec, data_root, tmp_path):
    tr = build(data_root, tmp_path / "o", name, extra=[f"TRAINER.{NODES[name]}.PREC", prec])
    assert tr.prec == "fp32" and tr.scaler is None
    assert all(p.dtype == torch.float32 for p in tr.clip_model.parameters())
    tr.set_model_mode("train")
    tr.batch_idx, tr.num_batches = 0, 10 ** 9
    out = tr.forward_backward(next(iter(tr.train_loader_x)))
    assert torch.isfinite(torch.tensor(out["loss"]))
    assert infer(tr, next(iter(tr.test_loader)))[0].dtype == torch.float32


@pytest.mark.parametrize("name,prec,fp32_params", [("CoOp", "fp16", False), ("CoOp", "fp16", True),
                                                    ("CoCoOp", "bf16", False), ("CoCoOp", "amp", False),
                                                    ("DPLCLIP", "fp16", False), ("DPLCLIP", "fp16", True),
                                                    ("DPLCLIP", "amp", False), ("BCAL", "fp16", False)])
def test_reduced_precision_code_paths_forced_on_cpu(name, prec, fp32_params, data_root, tmp_path, monkeypatch):
    """The GPU precision paths run end to end when the CPU fallback is switched off (no GradScaler off CUDA):
    CLIP cast to fp16/bf16 with the learnable parameters in CLIP's dtype (official) or fp32 (FP32_PARAMS);
    autocast over fp32 weights."""
    from dassl.engine.trainer import SimpleTrainer

    monkeypatch.setattr(SimpleTrainer, "resolve_precision", lambda self, p: p)
    node = NODES[name]
    tr = build(data_root, tmp_path / "o", name, extra=[f"TRAINER.{node}.PREC", prec,
                                                       f"TRAINER.{node}.FP32_PARAMS", str(fp32_params)])
    clip_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "amp": torch.float32}[prec]
    assert tr.prec == prec and tr.clip_model.token_embedding.weight.dtype == clip_dtype
    param_dtype = torch.float32 if fp32_params else clip_dtype
    assert all(p.dtype == param_dtype for p in tr._models[MODEL_NAMES[name]].parameters())
    assert tr.precision_info["learnable_params"] == str(param_dtype).replace("torch.", "")
    tr.set_model_mode("train")
    tr.batch_idx, tr.num_batches = 0, 10 ** 9
    before = [p.detach().clone() for p in tr._models[MODEL_NAMES[name]].parameters()]
    out = tr.forward_backward(next(iter(tr.train_loader_x)))
    assert torch.isfinite(torch.tensor(out["loss"]))
    after = list(tr._models[MODEL_NAMES[name]].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    res = infer(tr, next(iter(tr.test_loader)))
    assert all(r.dtype == torch.float32 and torch.isfinite(r).all() for r in res)


@pytest.mark.parametrize("name", NAMES)
def test_official_script_overrides_are_accepted(name, data_root, tmp_path):
    node = NODES[name]
    tr = build(data_root, tmp_path / "o", name, extra=[f"TRAINER.{node}.N_CTX", "16", f"TRAINER.{node}.CSC", "False",
                                                       f"TRAINER.{node}.CLASS_TOKEN_POSITION", "end"])
    assert tr.cfg.TRAINER[node].N_CTX == 16


@pytest.mark.parametrize("key,value", [("TRAINER.COOP.PREC", "fp8"), ("TRAINER.COOP.CLASS_TOKEN_POSITION", "side"),
                                       ("TRAINER.COCOOP.CSC", "True"), ("TRAINER.DPLCLIP.CTX_INIT", "a photo"),
                                       ("TRAINER.DPLCLIP.MLP_DEPTH", "1"), ("TRAINER.DPLCLIP.DOMAIN_POOL", "max"),
                                       ("TRAINER.DPLCLIP.LOGITS", "sum")])
def test_bad_config_values_are_config_errors(key, value, data_root, tmp_path):
    from dassl.utils.errors import ConfigError

    node = key.split(".")[1]
    name = {v: k for k, v in NODES.items()}[node]
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        build(data_root, tmp_path / "o", name, extra=[key, value])


# ------------------------------------------------------------------ CLI
@pytest.mark.parametrize("name", NAMES)
def test_cli_train_then_eval_only(name, data_root, tmp_path):
    out = str(tmp_path / "train")
    rec = run_cli(cli_args(data_root, out, name, config=config(name), extra=FAST + ["OPTIM.MAX_EPOCH", "1"]))
    assert rec["mode"] == "train"
    assert_logged_accuracy(out, rec)
    assert os.path.isfile(os.path.join(out, MODEL_NAMES[name], "model.pth.tar-1"))
    ev = str(tmp_path / "eval")
    if not HAVE_OPENSET:
        rec2 = run_cli(cli_args(data_root, ev, name, config=config(name), extra=FAST,
                                flags=["--eval-only", "--model-dir", out, "--load-epoch", "1"]))
        assert rec2["metrics"]["test"] == rec["metrics"]["test"]
        pytest.skip("datasets.openset is missing: open-set evaluation not tested (closed-set eval passed)")
    rec2 = run_cli(cli_args(data_root, ev, name, config=config(name), dataset_cfg="configs/datasets/PACS_DTD.yaml",
                            extra=FAST + ["TEST.OOD_SCORES", "['energy', 'mcm', 'knn']"],
                            flags=["--eval-only", "--model-dir", out, "--load-epoch", "1"]))
    assert rec2["mode"] == "eval"
    assert_ood_matches_scores(ev, rec2, ("energy", "mcm", "knn"))
    assert "OODD_FPR95:" in open(os.path.join(ev, "log.txt")).read()


def test_only_prompt_trainers_drop_token_buffers_when_loading():
    from dassl.engine.trainer import TrainerBase
    from trainers.prompt_trainer import PromptCLIPTrainer

    assert TrainerBase().load_model_drop_keys() == set()
    assert PromptCLIPTrainer.load_model_drop_keys(None) == {"token_prefix", "token_suffix"}
