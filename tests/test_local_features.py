"""Local image features (``clip_backbone.local``), their way through trainers, the feature cache and the scores.

Expected values: the global feature is the model's own ``encode_image`` (same process, same batch: bitwise); the
local features are recomputed from the module's weights along an independent route (ResNet: explicit matrix
products on the last stage's map; ViT ``value``: ``nn.MultiheadAttention`` with an identity attention pattern,
i.e. every token attends only to itself, which is the value path; ``tokens``: the blocks run one by one). Float
comparisons of different routes use 1e-5 (float32 reassociation of sums of a few hundred terms).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import COOP, cli_args, run_cli
from synthetic import write_lodo_tree

TOL = dict(rtol=1e-5, atol=1e-5)


def _clip(name: str):
    from clip_backbone import load_clip

    torch.manual_seed(0)
    return load_clip(name, "random").model


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ the encoder
@pytest.mark.parametrize("name,size,mode", [("tiny-rn64-test", 64, "value"), ("tiny-vit-test", 32, "value"),
                                            ("tiny-vit-test", 32, "tokens")])
def test_global_feature_is_encode_image_exactly(name, size, mode):
    from clip_backbone import LocalFeatureEncoder

    model = _clip(name)
    x = _images(3, size)
    with torch.no_grad():
        glob, _ = LocalFeatureEncoder(model.visual, mode)(x)
        assert torch.equal(glob, model.encode_image(x))


def test_resnet_local_features_are_value_and_output_projections_of_the_last_map():
    from clip_backbone import LocalFeatureEncoder

    model = _clip("tiny-rn64-test")
    v = model.visual
    x = _images(2, 64)
    with torch.no_grad():
        _, local = LocalFeatureEncoder(v)(x)
        fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))      # (N, C, 2, 2)
        n, c, h, w = fmap.shape
        tokens = fmap.permute(0, 2, 3, 1).reshape(n, h * w, c)          # row-major positions, no pos. embedding
        pool = v.attnpool
        ref = (tokens @ pool.v_proj.weight.T + pool.v_proj.bias) @ pool.c_proj.weight.T + pool.c_proj.bias
    assert local.shape == (2, 4, 32) and h * w == 4
    torch.testing.assert_close(local, ref, **TOL)


def _vit_tokens_before_last_block(v, x):
    t = v.conv1(x).flatten(2).transpose(1, 2)
    cls = v.class_embedding.expand(t.shape[0], 1, -1)
    t = v.ln_pre(torch.cat([cls, t], dim=1) + v.positional_embedding)
    for blk in v.transformer.resblocks[:-1]:
        t = blk(t)
    return t


def test_vit_value_path_equals_self_only_attention():
    from clip_backbone import LocalFeatureEncoder

    model = _clip("tiny-vit-test")
    v = model.visual
    x = _images(2, 32)
    with torch.no_grad():
        _, local = LocalFeatureEncoder(v, "value")(x)
        t = _vit_tokens_before_last_block(v, x)
        blk = v.transformer.resblocks[-1]
        own = torch.full((t.shape[1], t.shape[1]), float("-inf")).fill_diagonal_(0.0)  # each token sees itself
        y = blk.ln_1(t)
        vv = t + blk.attn(y, y, y, attn_mask=own, need_weights=False)[0]
        vv = vv + blk.mlp(blk.ln_2(vv))
        ref = v.ln_post(vv)[:, 1:] @ v.proj
    assert local.shape == (2, 16, 32)
    torch.testing.assert_close(local, ref, **TOL)


def test_vit_tokens_mode_is_the_final_patch_tokens():
    from clip_backbone import LocalFeatureEncoder

    model = _clip("tiny-vit-test")
    v = model.visual
    x = _images(2, 32)
    with torch.no_grad():
        _, local = LocalFeatureEncoder(v, "tokens")(x)
        t = v.transformer.resblocks[-1](_vit_tokens_before_last_block(v, x))
        ref = v.ln_post(t[:, 1:]) @ v.proj
        _, value = LocalFeatureEncoder(v, "value")(x)
    torch.testing.assert_close(local, ref, **TOL)
    assert not torch.allclose(local, value, **TOL)   # the two definitions really differ


def test_unsupported_towers_and_modes_are_one_line_errors():
    from open_clip.transformer import VisionTransformer

    from clip_backbone import LocalFeatureEncoder
    from dassl.utils.errors import ConfigError

    rn = _clip("tiny-rn-test").visual
    for visual, mode, needle in (
            (rn, "tokens", "only for ViT"), (rn, "patch", "must be one of"),
            (VisionTransformer(32, 8, 32, 1, 2, 2.0, output_dim=32, pool_type="avg"), "value", "pool_type"),
            (torch.nn.Linear(3, 3), "value", "unsupported image tower")):
        with pytest.raises(ConfigError) as err:
            LocalFeatureEncoder(visual, mode)
        assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_rn50_local_features_are_49_by_1024_at_224_px():
    """docs/performance.md: RN50 at 224 px keeps 49 x 1024 local floats per image (7 x 7 map, 1024-d)."""
    from clip_backbone import LocalFeatureEncoder

    model = _clip("RN50")
    with torch.no_grad():
        glob, local = LocalFeatureEncoder(model.visual)(_images(1, 224))
    assert glob.shape == (1, 1024) and local.shape == (1, 49, 1024)


@pytest.mark.slow
def test_vit_b16_local_features_are_196_by_512_at_224_px():
    """docs/performance.md: ViT-B/16 at 224 px keeps 196 x 512 local floats per image (14 x 14 patches)."""
    from clip_backbone import LocalFeatureEncoder

    model = _clip("ViT-B/16")
    with torch.no_grad():
        glob, local = LocalFeatureEncoder(model.visual)(_images(1, 224))
    assert glob.shape == (1, 512) and local.shape == (1, 196, 512)


def test_demo_tiny_clip_has_one_region_at_32_px():
    """configs/trainers/LoCoOp/demo_digits.yaml: one local region per image on tinyclip-rn32 at 32 px."""
    from clip_backbone import LocalFeatureEncoder

    with torch.no_grad():
        _, local = LocalFeatureEncoder(_clip("tinyclip-rn32").visual)(_images(2, 32))
    assert local.shape[:2] == (2, 1)


# ------------------------------------------------------------------ the scores
def _np_gl_mcm(logits, local_logits, scale, T, lam=1.0):
    """GL-MCM as the authors compute it: softmax(cos / T) over classes, global max + lam * max over regions and
    classes (their scores are negated; here higher = more ID)."""
    def softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)

    glob = softmax(np.asarray(logits, np.float64) / scale / T).max(axis=1)
    loc = softmax(np.asarray(local_logits, np.float64) / scale / T).max(axis=(1, 2))
    return glob + lam * loc, loc


@pytest.mark.parametrize("T", [1.0, 0.01])
def test_gl_mcm_and_l_mcm_equal_the_authors_formula_on_random_inputs(T):
    from dassl.evaluation.scores import ScoreInputs, compute_score, gl_mcm_score, reduce_local

    g = torch.Generator().manual_seed(3)
    logits = 100 * (2 * torch.rand(5, 6, generator=g) - 1)
    local = 100 * (2 * torch.rand(5, 9, 6, generator=g) - 1)
    inp = ScoreInputs(logits=logits.double(), logit_scale=100.0, mcm_temperature=T)
    inp.local = reduce_local(["gl_mcm", "l_mcm"], local, inp)
    want, want_local = _np_gl_mcm(logits.numpy(), local.numpy(), 100.0, T)
    np.testing.assert_allclose(compute_score("gl_mcm", inp), want, rtol=1e-6)
    np.testing.assert_allclose(compute_score("l_mcm", inp), want_local, rtol=1e-6)
    half = gl_mcm_score(logits.double() / 100, local / 100, T, lambda_local=0.5).numpy()
    np.testing.assert_allclose(half, _np_gl_mcm(logits.numpy(), local.numpy(), 100.0, T, 0.5)[0], rtol=1e-6)


def _whole_tensor_l_mcm(local, scale, T):
    """L-MCM as the evaluation computed it before the per-batch reduction: float32 softmax over the classes of
    the whole N x R x C tensor's cosines / T, max over regions and classes."""
    return torch.softmax(local.float() / scale / T, dim=2).amax(dim=(1, 2))


@pytest.mark.parametrize("T", [1.0, 0.07])
def test_per_batch_reduction_is_bit_identical_to_the_whole_tensor_formula(T):
    """Softmax over a region's classes and the max over an image's regions never mix images, so reducing batch
    by batch gives the same float32 numbers as the whole-tensor formula, for any batching (bitwise)."""
    from dassl.evaluation.scores import ScoreInputs, compute_score, reduce_local

    g = torch.Generator().manual_seed(5)
    logits = 100 * (2 * torch.rand(23, 7, generator=g) - 1)
    local = 100 * (2 * torch.rand(23, 11, 7, generator=g) - 1)
    settings = ScoreInputs(logit_scale=100.0, mcm_temperature=T)
    whole = _whole_tensor_l_mcm(local, 100.0, T)
    for batch in (1, 4, 7, 23):
        parts = [reduce_local(["gl_mcm", "l_mcm"], local[i:i + batch], settings) for i in range(0, 23, batch)]
        for name in ("gl_mcm", "l_mcm"):
            got = torch.cat([p[name] for p in parts])
            assert got.dtype == torch.float32 and torch.equal(got, whole), (batch, name)
    inp = ScoreInputs(logits=logits.double(), logit_scale=100.0, mcm_temperature=T,
                      local={"gl_mcm": whole.double(), "l_mcm": whole.double()})
    glob = torch.softmax(logits.double() / 100.0 / T, dim=1).max(dim=1).values  # the previous gl_mcm: MCM + 1 x L-MCM
    assert np.array_equal(compute_score("gl_mcm", inp), (glob + 1.0 * whole.to(torch.float64)).numpy())
    assert np.array_equal(compute_score("l_mcm", inp), whole.double().numpy())


def test_a_reducer_shared_by_scores_runs_once_and_is_checked(monkeypatch):
    from dataclasses import replace

    from dassl.evaluation import scores as S

    calls = []

    def counted(local, settings):
        calls.append(local.shape[0])
        return S.max_local_softmax(local, settings)

    for name in ("gl_mcm", "l_mcm"):
        monkeypatch.setitem(S._REGISTRY, name, replace(S._REGISTRY[name], reduce_local=counted))
    out = S.reduce_local(["energy", "gl_mcm", "l_mcm"], torch.zeros(3, 2, 4), S.ScoreInputs())
    assert calls == [3] and set(out) == {"gl_mcm", "l_mcm"} and out["gl_mcm"] is out["l_mcm"]
    assert out["l_mcm"].tolist() == [0.25] * 3   # equal cosines: softmax 1/4 everywhere
    monkeypatch.setitem(S._REGISTRY, "l_mcm", replace(S._REGISTRY["l_mcm"], reduce_local=lambda x, s: x.sum(1)))
    with pytest.raises(ValueError, match=r"score 'l_mcm': reduce_local returned .*expected \(3,\)"):
        S.reduce_local(["l_mcm"], torch.zeros(3, 2, 4), S.ScoreInputs())
    for kwargs in ({"needs": ("local_logits",)}, {"needs": ("logits",), "reduce_local": counted}):
        with pytest.raises(ValueError, match="a score that needs local_logits gives reduce_local"):
            S.register_score("never_registered", **kwargs)
    assert "never_registered" not in S.score_names()


def test_inference_output_checks_local_logits():
    from dassl.engine.inference import InferenceOutput

    out = InferenceOutput(logits=torch.zeros(2, 3), local_logits=torch.zeros(2, 5, 3))
    assert out.local_logits.shape == (2, 5, 3)
    for bad in (torch.zeros(2, 3), torch.zeros(4, 5, 3)):
        with pytest.raises(TypeError, match="local_logits must be a tensor with 2 rows and 3 dims"):
            InferenceOutput(logits=torch.zeros(2, 3), local_logits=bad)


def test_local_scores_need_local_logits():
    from dassl.evaluation.scores import ScoreInputs, missing_inputs, score_needs

    assert score_needs("gl_mcm") == ("logits", "local_logits") and score_needs("l_mcm") == ("local_logits",)
    assert missing_inputs("gl_mcm", ScoreInputs(logits=torch.zeros(2, 3))) == ["local_logits"]
    assert missing_inputs("gl_mcm", ScoreInputs(logits=torch.zeros(2, 3), local={"l_mcm": torch.zeros(2)})) == [
        "local_logits"]   # another score's reduction is not this one's
    assert missing_inputs("gl_mcm", ScoreInputs(logits=torch.zeros(2, 3), local={"gl_mcm": torch.zeros(2)})) == []


# ------------------------------------------------------------------ trainers
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from synthetic_openset import write_dtd_like

    root = str(tmp_path_factory.mktemp("local_data"))
    write_lodo_tree(root, per_class=3)
    write_dtd_like(root)
    return root


VIT = ["MODEL.BACKBONE.NAME", "tiny-vit-test"]


def _build(root, out, trainer, extra=(), dataset="PACS_DTD", cfg="rn50_ep30"):
    import train
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed

    args = cli_args(root, str(out), trainer, config=os.path.join(COOP, f"configs/trainers/{trainer}/{cfg}.yaml"),
                    dataset_cfg=os.path.join(COOP, f"configs/datasets/{dataset}.yaml"), extra=VIT + list(extra))
    cfg = train.setup_cfg(train.get_parser().parse_args(args))
    set_random_seed(cfg.SEED)
    return build_trainer(cfg)


GL = ["TEST.OOD_SCORES", "['energy', 'gl_mcm']"]


def _encoder_reference(tr, images):
    from clip_backbone import LocalFeatureEncoder

    with torch.no_grad():
        glob, local = LocalFeatureEncoder(tr.clip_model.visual, "value")(images)
    return F.normalize(glob, dim=-1), F.normalize(local, dim=-1)


def test_zsclip_local_logits_use_its_class_text_features(data_root, tmp_path):
    tr = _build(data_root, tmp_path / "z", "ZeroshotCLIP", GL)
    assert tr.wants_local and not tr.infer_local
    batch = next(iter(tr.test_loader))
    without = tr.model_inference(batch["img"])   # a pass that did not ask for them (accuracy)
    tr.infer_local = True
    out = tr.model_inference(batch["img"])
    assert without.local_logits is None and torch.equal(without.logits, out.logits)   # same batch, same process
    glob, local = _encoder_reference(tr, batch["img"])
    t = tr.text_feats
    torch.testing.assert_close(out.logits, tr.logit_scale * glob @ t.T, **TOL)
    torch.testing.assert_close(out.local_logits, tr.logit_scale * local @ t.T, **TOL)
    plain = _build(data_root, tmp_path / "p", "ZeroshotCLIP")
    assert not plain.wants_local and plain.local_image_encoder is None
    assert not _build(data_root, tmp_path / "c", "ZeroshotCLIP", GL, dataset="PACS").wants_local  # no open set
    assert plain.model_inference(batch["img"]).local_logits is None


def test_coop_local_logits_use_the_learned_prompts(data_root, tmp_path):
    tr = _build(data_root, tmp_path / "c", "CoOp", GL)
    tr.infer_local = True
    with torch.no_grad():
        tr.prompt_learner.ctx.normal_(0, 0.5)   # a trained-looking context
        batch = next(iter(tr.test_loader))
        out = tr.model_inference(batch["img"])
        t = F.normalize(tr.text_features(), dim=-1)
    glob, local = _encoder_reference(tr, batch["img"])
    torch.testing.assert_close(out.logits, tr.logit_scale * glob @ t.T, **TOL)
    torch.testing.assert_close(out.local_logits, tr.logit_scale * local @ t.T, **TOL)


def test_croft_local_features_go_through_the_image_adapter(data_root, tmp_path):
    from clip_backbone import LocalFeatureEncoder

    tr = _build(data_root, tmp_path / "f", "CRoFT", GL + ["TRAINER.CRoFT.ratio", "0.3"])
    tr.infer_local = True
    with torch.no_grad():
        tr.adapter.fc_i.normal_(0, 0.3)
        tr.adapter.fc_t.normal_(0, 0.3)
    batch = next(iter(tr.test_loader))
    with torch.no_grad():
        out = tr.model_inference(batch["img"])
        _, raw_local = LocalFeatureEncoder(tr.clip_model.visual)(batch["img"])
        rho, rho_t, eps = 0.3, tr.opts.ratio_text, 1e-6
        mix = rho * raw_local @ tr.adapter.fc_i.T + (1 - rho) * raw_local          # n(ρ L W_iᵀ + (1 − ρ) L)
        l_hat = mix / (mix.norm(dim=-1, keepdim=True) + eps)
        tm = rho_t * tr.text_feats @ tr.adapter.fc_t.T + (1 - rho_t) * tr.text_feats
        t_hat = tm / (tm.norm(dim=-1, keepdim=True) + eps)
    torch.testing.assert_close(out.local_logits, tr.logit_scale * l_hat @ t_hat.T, **TOL)


def test_methods_without_local_features_are_refused_with_one_line(data_root, tmp_path):
    from procs import run_train_forked

    out = str(tmp_path / "ca")
    args = cli_args(data_root, out, "CLIP_Adapter", config="configs/trainers/CLIP_Adapter/rn50_ep30.yaml",
                    dataset_cfg="configs/datasets/PACS_DTD.yaml", extra=["TEST.OOD_SCORES", "['energy', 'l_mcm']"],
                    flags=["--eval-only"])
    res = run_train_forked(args, str(tmp_path))
    lines = res.error_lines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "TEST.OOD_SCORES: l_mcm needs local image features" in lines[0] and "CLIP_Adapter" in lines[0]
    assert all(n in lines[0] for n in ("LoCoOp", "ZeroshotCLIP", "CRoFT")) and "Traceback" not in res.stderr
    assert not os.path.exists(os.path.join(out, "record.json"))


# ------------------------------------------------------------------ evaluation and the feature cache
def _eval(root, out, extra, cache_dir=None):
    cache = ["FEATURE_CACHE.ENABLED", "True", "FEATURE_CACHE.DIR", str(cache_dir)] if cache_dir else []
    return run_cli(cli_args(root, str(out), "ZeroshotCLIP", config="configs/trainers/ZeroshotCLIP/rn50_ep30.yaml",
                            dataset_cfg="configs/datasets/PACS_DTD.yaml", flags=["--eval-only"],
                            extra=VIT + ["DATALOADER.OOD_TEST.TRANSFORM", "test", "DATALOADER.TEST.BATCH_SIZE", "7",
                                         "TEST.SAVE_PLOTS", "False"] + extra + cache))


def test_gl_mcm_end_to_end_with_and_without_the_feature_cache(data_root, tmp_path):
    from sklearn.metrics import roc_auc_score

    scores = ["TEST.OOD_SCORES", "['energy', 'mcm', 'gl_mcm', 'l_mcm']"]
    rec = _eval(data_root, tmp_path / "plain", scores)
    z = np.load(tmp_path / "plain" / "scores.npz")
    assert {"test__score_gl_mcm", "ood_test__score_gl_mcm", "ood_test__score_l_mcm"} <= set(z.files)
    assert not any("local_logits" in k for k in z.files)
    for name in ("gl_mcm", "l_mcm"):
        det = rec["metrics"]["ood"][name]
        keep = z["test__logits"].argmax(1) == z["test__labels"]
        id_s, ood_s = z["test__score_" + name][keep], z["ood_test__score_" + name]
        truth = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
        assert det["num_id"] == keep.sum() and abs(det["auroc"] - roc_auc_score(truth, np.r_[id_s, ood_s])) < 1e-9
    # gl_mcm = mcm + l_mcm (both at T = 1)
    np.testing.assert_allclose(z["ood_test__score_gl_mcm"], z["ood_test__score_mcm"] + z["ood_test__score_l_mcm"],
                               rtol=1e-6)
    assert rec["protocol"]["switches"]["MODEL.BACKBONE.LOCAL_FEATURES"] == "value"

    cached = _eval(data_root, tmp_path / "cached", scores, cache_dir=tmp_path / "fc")
    assert cached["feature_cache"]["hits"] > 0
    zc = np.load(tmp_path / "cached" / "scores.npz")
    for key in ("test__score_gl_mcm", "ood_test__score_gl_mcm", "val__score_l_mcm"):
        np.testing.assert_allclose(zc[key], z[key], rtol=1e-5, atol=1e-6)   # other batching: float32 rounding
    kinds = sorted(os.listdir(os.path.join(tmp_path / "fc", os.listdir(tmp_path / "fc")[0])))
    assert kinds == ["test", "test_local"]
    # a run without a local score neither computes nor stores local features
    plain = _build(data_root, tmp_path / "e", "ZeroshotCLIP", ["TEST.OOD_SCORES", "['energy']", "FEATURE_CACHE.ENABLED",
                                                               "True", "FEATURE_CACHE.DIR", str(tmp_path / "fc2")])
    assert next(iter(plain.test_loader))["img"].dim() == 2
    assert sorted(os.listdir(plain.feature_cache.dir)) == ["test"]


def test_saved_local_scores_equal_the_whole_tensor_formula_bitwise(data_root, tmp_path):
    """train.py --eval-only reduces each batch's local logits at once: ``scores.npz`` keeps one number per image
    (``<split>__local_<score>``), and the saved L-MCM / GL-MCM equal the whole-tensor formula on the N x R x C
    local logits of the same model and batches (recomputed here; bitwise: same process, same batches)."""
    scores = ["TEST.OOD_SCORES", "['energy', 'mcm', 'gl_mcm', 'l_mcm']"]
    _eval(data_root, tmp_path / "run", scores)
    z = np.load(tmp_path / "run" / "scores.npz")
    assert all(z[k].ndim <= 2 for k in z.files)   # no N x R x C array is kept
    tr = _build(data_root, tmp_path / "ref", "ZeroshotCLIP",
                scores + ["DATALOADER.OOD_TEST.TRANSFORM", "test", "DATALOADER.TEST.BATCH_SIZE", "7"])
    tr.infer_local = True
    for split in ("test", "ood_test", "val"):
        logits, local = [], []
        with torch.no_grad():
            for batch in tr.split_loader(split):
                out = tr.model_inference(batch["img"])
                logits.append(out.logits)
                local.append(out.local_logits.float())
        assert np.array_equal(torch.cat(logits).numpy(), z[f"{split}__logits"])   # the same model and batches
        whole = _whole_tensor_l_mcm(torch.cat(local), tr.logit_scale_value(), 1.0).double().numpy()
        assert z[f"{split}__local_gl_mcm"].shape == z[f"{split}__local_l_mcm"].shape == whole.shape
        assert np.array_equal(z[f"{split}__score_l_mcm"], whole)
        assert np.array_equal(z[f"{split}__score_gl_mcm"], z[f"{split}__score_mcm"] + whole)


def test_a_new_local_score_is_one_function_with_its_reduction(data_root, tmp_path, monkeypatch):
    """docs/extending.md's example: registered with ``reduce_local``, it reaches the detection splits' outputs as
    ``local_<score>`` (one value per image) and equals its formula on the model's local logits."""
    from dassl.evaluation import scores as S

    monkeypatch.setattr(S, "_REGISTRY", dict(S._REGISTRY))   # the example is registered for this test only

    def mean_region_max(local_logits, settings):
        return (local_logits / settings.logit_scale).amax(dim=2).mean(dim=1)

    @S.register_score("mean_region_max", needs=("local_logits",), reduce_local=mean_region_max)
    def mean_region_max_score(inp):
        return inp.local["mean_region_max"]

    tr = _build(data_root, tmp_path / "z", "ZeroshotCLIP", ["TEST.OOD_SCORES", "['energy', 'mean_region_max']",
                                                            "DATALOADER.OOD_TEST.TRANSFORM", "test"])
    assert tr.wants_local
    out = tr.collect_outputs("ood_test")
    tr.infer_local = True
    with torch.no_grad():
        local = torch.cat([tr.model_inference(b["img"]).local_logits for b in tr.split_loader("ood_test")])
    want = (local / tr.logit_scale_value()).amax(dim=2).mean(dim=1)
    assert out["local_mean_region_max"].shape == (len(local),)
    np.testing.assert_allclose(out["local_mean_region_max"], want.numpy(), rtol=1e-6)   # float32 mean over R
    inp = S.ScoreInputs(local={"mean_region_max": torch.from_numpy(out["local_mean_region_max"]).double()})
    assert np.array_equal(S.compute_score("mean_region_max", inp), out["local_mean_region_max"].astype(np.float64))


class _Counting:
    """A trainer's local image encoder that counts its calls (the real encoder runs)."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, 0

    def __call__(self, images):
        self.calls += 1
        return self.encoder(images)


def test_only_detection_passes_compute_local_features(data_root, tmp_path):
    """Accuracy passes and the training split of fitted scores never compute local features; the open-set
    detection splits do, once per batch; accuracy is what it was when every pass computed them."""
    tr = _build(data_root, tmp_path / "z", "ZeroshotCLIP", GL + ["DATALOADER.TEST.BATCH_SIZE", "7"])
    counter = tr.local_image_encoder = _Counting(tr.local_image_encoder)
    acc = {split: dict(tr.test(split)) for split in ("val", "test")}
    assert counter.calls == 0
    assert not any(k.startswith("local_") for k in tr.collect_outputs("train")) and counter.calls == 0
    out = tr.collect_outputs("test")
    assert counter.calls == len(tr.test_loader) and not tr.infer_local
    assert out["local_gl_mcm"].shape == (len(out["labels"]),) and "local_l_mcm" not in out
    tr.infer_local = True   # the previous behaviour: every inference pass computed them
    assert {split: dict(tr.test(split)) for split in ("val", "test")} == acc
    assert counter.calls == len(tr.test_loader) + len(tr.val_loader) + len(tr.test_loader)


def test_tokens_mode_has_its_own_cache_store(data_root, tmp_path):
    tr = _build(data_root, tmp_path / "z", "ZeroshotCLIP",
                GL + ["FEATURE_CACHE.ENABLED", "True", "FEATURE_CACHE.DIR", str(tmp_path / "fc"),
                      "MODEL.BACKBONE.LOCAL_FEATURES", "tokens"])
    assert tr.local_image_encoder.mode == "tokens"
    next(iter(tr.test_loader))
    assert sorted(os.listdir(tr.feature_cache.dir)) == ["test", "test_local-tokens"]


def test_cached_local_rows_are_global_then_local(data_root, tmp_path):
    """The cache's (1 + R) x D rows: the global feature first, then the R local features of the same image."""
    from clip_backbone import LocalFeatureEncoder

    tr = _build(data_root, tmp_path / "z", "ZeroshotCLIP",
                GL + ["FEATURE_CACHE.ENABLED", "True", "FEATURE_CACHE.DIR", str(tmp_path / "fc"),
                      "DATALOADER.OOD_TEST.TRANSFORM", "test"])
    batch = next(iter(tr.test_loader))
    assert batch["img"].shape[1:] == (17, 32)
    from dassl.data.data_manager import read_image

    images = torch.stack([tr.dm.tfm_test(read_image(p)) for p in batch["impath"]])
    with torch.no_grad():
        glob, local = LocalFeatureEncoder(tr.clip_model.visual)(images)
    torch.testing.assert_close(batch["img"][:, 0], glob, **TOL)
    torch.testing.assert_close(batch["img"][:, 1:], local, **TOL)
    g2, l2 = tr.encode_images_local(batch["img"].clone(), batch)
    assert torch.equal(g2, batch["img"][:, 0]) and torch.equal(tr.encode_images(batch["img"]), batch["img"][:, 0])
