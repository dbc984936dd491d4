"""CLIP-Adapter and Tip-Adapter-F baselines on the tiny random CLIP and synthetic PACS/VLCS trees."""
from __future__ import annotations

import os

import pytest
import torch

from dassl.engine.inference import InferenceOutput
from helpers import COOP, assert_logged_accuracy, assert_ood_matches_scores, cli_args, run_cli
from synthetic import write_lodo_tree
from synthetic_openset import write_dtd_like

CONFIGS = {"CLIP_Adapter": "configs/trainers/CLIP_Adapter/rn50_ep30.yaml",
           "TIP_ADAPTER": "configs/trainers/TIP_ADAPTER/rn50_ep30.yaml"}
FAST = ["OPTIM.WARMUP_EPOCH", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "12", "TRAINER.TIP_ADAPTER.AUGMENT_EPOCH", "2",
        "TRAINER.TIP_ADAPTER.CACHE_MODE", "fixed"]


def fast(trainer):
    """FAST without Tip-Adapter's keys for other trainers (a key the trainer ignores is refused)."""
    return FAST if trainer == "TIP_ADAPTER" else FAST[:4]
FEWSHOT = ["DATASET.NUM_SHOTS", "3", "DATASET.FEWSHOT_SAMPLER", "per_class_domain"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_lodo_tree(str(root), per_class=6)
    write_lodo_tree(str(root), folder="VLCS", domains=("caltech", "labelme", "pascal", "sun"),
                    classes=("bird", "car", "chair"), per_class=6)
    write_dtd_like(str(root))
    return str(root)


def build(root, out, trainer, extra=(), seed=1, dataset="PACS"):
    """A trainer object configured exactly like ``train.py`` would (seeded, configs layered)."""
    import train
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed

    args = cli_args(root, str(out), trainer, dataset_cfg=os.path.join(COOP, f"configs/datasets/{dataset}.yaml"),
                    config=os.path.join(COOP, CONFIGS[trainer]), extra=fast(trainer) + list(extra), seed=seed)
    if dataset == "VLCS":
        args[args.index("TEST_ENV") + 1] = "sun"
    cfg = train.setup_cfg(train.get_parser().parse_args(args))
    set_random_seed(cfg.SEED)
    return build_trainer(cfg)


def first_batch(loader):
    return next(iter(loader))


def fit_fixed_batch(tr, batch, steps):
    tr.set_model_mode("train")
    tr.batch_idx, tr.num_batches = 0, 10 ** 9  # never the last batch: no LR step
    return [tr.forward_backward(batch)["loss"] for _ in range(steps)]


def infer(tr, batch):
    tr.set_model_mode("eval")
    with torch.no_grad():
        out = tr.model_inference(batch["img"])
    assert isinstance(out, InferenceOutput) and out.features is not None
    return out.logits, out.features, out.score


def feature_dim(tr):
    return (tr.text_feats if hasattr(tr, "text_feats") else tr.clip_weights).shape[1]


def install_separable_features(tr, noise=0.3, seed=0):
    """Replace the frozen encoder by class prototypes + per-image noise (engine hook ``feature_provider``).

    The random tiny CLIP maps every image to (nearly) the same direction, so "learning" on its features tests
    nothing; with separable features the trainers' own optimisation is what lowers the loss.
    """
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(tr.num_classes, feature_dim(tr), generator=g)
    per_item = torch.randn(len(tr.dm.dataset.train_x), feature_dim(tr), generator=g)

    def provider(images, batch):
        return protos[batch["label"]] + noise * per_item[batch["index"]]

    tr.feature_provider = provider


# ------------------------------------------------------------------ build, outputs, learning
@pytest.mark.parametrize("name,model_name,lr", [("CLIP_Adapter", "clip_adapter", "1.0"),
                                                ("TIP_ADAPTER", "adapter", "0.05")])
def test_builds_learns_and_outputs(name, model_name, lr, data_root, tmp_path):
    tr = build(data_root, tmp_path / "o", name)
    assert tr.get_model_names() == [model_name]
    assert [n for n, p in tr.clip_model.named_parameters() if p.requires_grad] == []
    test_batch = first_batch(tr.test_loader)
    logits, feats, energy = infer(tr, test_batch)
    assert logits.shape == (len(test_batch["img"]), tr.num_classes)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(len(feats)))
    torch.testing.assert_close(energy, torch.logsumexp(logits, dim=1))
    tr = build(data_root, tmp_path / "o2", name, extra=["OPTIM.LR", lr, "OPTIM.WEIGHT_DECAY", "5e-4"])
    if name == "TIP_ADAPTER":
        tr.prepare_cache()  # keys from the (uninformative) encoder: the key layer must learn the task
    install_separable_features(tr)
    clip_before = {k: v.clone() for k, v in tr.clip_model.state_dict().items()}
    losses = fit_fixed_batch(tr, first_batch(tr.train_loader_x), 30)
    assert losses[-1] < 0.6 * losses[0], losses
    for k, v in tr.clip_model.state_dict().items():
        assert torch.equal(v, clip_before[k]), k


def test_clip_adapter_forward_matches_formula(data_root, tmp_path):
    tr = build(data_root, tmp_path / "o", "CLIP_Adapter", extra=["TRAINER.CLIP_ADAPTER.RATIO", "0.3"])
    adapter = tr.adapter
    assert [type(m).__name__ for m in adapter.fc] == ["Linear", "ReLU", "Linear", "ReLU"]
    assert adapter.fc[0].bias is None and adapter.fc[0].out_features == tr.text_feats.shape[1] // 4
    images = first_batch(tr.test_loader)["img"]
    x = tr.encode_images(images).float()
    f = 0.3 * adapter(x) + 0.7 * x
    f = f / f.norm(dim=-1, keepdim=True)
    t = tr.text_feats / tr.text_feats.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(infer(tr, {"img": images})[0], tr.logit_scale * f @ t.t())


def test_tip_adapter_cache_init_and_formula(data_root, tmp_path):
    tr = build(data_root, tmp_path / "o", "TIP_ADAPTER", extra=FEWSHOT + ["TRAINER.TIP_ADAPTER.BETA", "3",
                                                                          "TRAINER.TIP_ADAPTER.ALPHA", "2"])
    n, dim = len(tr.dm.dataset.train_x), feature_dim(tr)
    base = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    seen, returned = [], []

    def provider(images, batch):  # per-image feature + an augmentation-dependent part
        seen.extend(batch["index"].tolist())
        f = base[batch["index"]] + images.mean(dim=(1, 2, 3))[:, None]
        returned.append(f)
        return f

    tr.feature_provider = provider
    tr.prepare_cache()
    stored = torch.load(tr.cache_path(), weights_only=False)
    tr.feature_provider = None
    assert seen == list(range(n)) * 2  # AUGMENT_EPOCH 2 passes, unshuffled
    passes = torch.cat(returned).view(2, n, dim)
    expected_keys = passes.mean(0)
    expected_keys = expected_keys / expected_keys.norm(dim=-1, keepdim=True)
    assert not torch.allclose(passes[0], passes[1])  # the passes were augmented differently
    keys, labels = stored["keys"], stored["labels"]
    assert len(labels) == n == 9 == tr.adapter.n_cache
    torch.testing.assert_close(keys, expected_keys)
    torch.testing.assert_close(tr.adapter.weight.detach(), keys, rtol=0, atol=0)
    assert torch.equal(labels, torch.tensor([d.label for d in tr.dm.dataset.train_x]))
    assert torch.equal(tr.adapter.cache_values, torch.nn.functional.one_hot(labels, tr.num_classes).float())
    images = first_batch(tr.test_loader)["img"]
    x = tr.encode_images(images).float()
    x = x / x.norm(dim=-1, keepdim=True)
    expected = 100.0 * x @ tr.clip_weights.t() + 2.0 * torch.exp(-3.0 * (1 - x @ keys.t())) @ \
        torch.nn.functional.one_hot(labels, tr.num_classes).float()
    torch.testing.assert_close(infer(tr, {"img": images})[0], expected)


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["CLIP_Adapter", "TIP_ADAPTER"])
def test_checkpoint_round_trip(name, data_root, tmp_path):
    tr = build(data_root, tmp_path / "a", name, extra=FEWSHOT + ["OPTIM.LR", "0.2"])
    fit_fixed_batch(tr, first_batch(tr.train_loader_x), 5)
    batch = first_batch(tr.test_loader)
    ref = infer(tr, batch)
    tr.save_model(0, str(tmp_path / "ckpt"))
    fresh = build(data_root, tmp_path / "b", name, extra=FEWSHOT)
    if name == "CLIP_Adapter":  # untrained adapter differs from the trained one
        assert not torch.equal(infer(fresh, batch)[0], ref[0])
    fresh.load_model(str(tmp_path / "ckpt"), epoch=1)
    got = infer(fresh, batch)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if name == "TIP_ADAPTER":  # a loaded model needs no cache build
        assert not (tmp_path / "b" / "tip_cache").exists()


@pytest.mark.parametrize("name", ["CLIP_Adapter", "TIP_ADAPTER"])
def test_cli_train_then_eval_only(name, data_root, tmp_path):
    out = str(tmp_path / "train")
    extra = FEWSHOT + ["OPTIM.MAX_EPOCH", "2"]
    rec = run_cli(cli_args(data_root, out, name, config=CONFIGS[name], extra=fast(name) + extra))
    assert_logged_accuracy(out, rec)
    assert os.path.isfile(os.path.join(out, rec_model_name(name), "model.pth.tar-2"))
    ev = str(tmp_path / "eval")
    rec2 = run_cli(cli_args(data_root, ev, name, config=CONFIGS[name], extra=fast(name) + extra,
                            flags=["--eval-only", "--model-dir", out, "--load-epoch", "2"]))
    assert rec2["mode"] == "eval" and rec2["metrics"]["test"] == rec["metrics"]["test"]  # last epoch reloaded
    assert_logged_accuracy(ev, rec2)


def rec_model_name(name):
    return {"CLIP_Adapter": "clip_adapter", "TIP_ADAPTER": "adapter"}[name]


def test_tip_eval_on_openset_dataset_with_other_train_list(data_root, tmp_path):
    """Setup-II open-set eval (PACS_DTD, NUM_SHOTS -1): the checkpoint's cache size wins, no images are cached."""
    out = str(tmp_path / "train")
    run_cli(cli_args(data_root, out, "TIP_ADAPTER", config=CONFIGS["TIP_ADAPTER"],
                     extra=FAST + FEWSHOT + ["OPTIM.MAX_EPOCH", "1"]))
    ev = str(tmp_path / "eval")
    rec = run_cli(cli_args(data_root, ev, "TIP_ADAPTER", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                           config=CONFIGS["TIP_ADAPTER"], extra=FAST + ["TEST.OOD_SCORES", "['energy', 'knn']"],
                           flags=["--eval-only", "--model-dir", out, "--load-epoch", "1"]))
    assert_ood_matches_scores(ev, rec, ("energy", "knn"))
    assert not os.path.exists(os.path.join(ev, "tip_cache"))


def test_tip_official_cache_shuffled_drop_last_shared_file(data_root, tmp_path):
    """Official cache: passes of the shuffled, drop-last training loader; one file per shots/seed for all datasets."""
    cache = str(tmp_path / "shared")
    common = FEWSHOT + ["TRAINER.TIP_ADAPTER.CACHE_MODE", "official", "TRAINER.TIP_ADAPTER.CACHE_DIR", cache,
                        "DATALOADER.TRAIN_X.BATCH_SIZE", "4"]
    tr = build(data_root, tmp_path / "o", "TIP_ADAPTER", extra=common)
    import train
    from dassl.config import get_cfg_default

    default = get_cfg_default()
    train.extend_cfg(default)
    assert default.TRAINER.TIP_ADAPTER.CACHE_MODE == "official"
    n, dim = len(tr.dm.dataset.train_x), feature_dim(tr)
    base = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    seen, returned = [], []

    def provider(images, batch):
        seen.append(batch["index"].tolist())
        returned.append(base[batch["index"]])
        return base[batch["index"]]

    tr.feature_provider = provider
    tr.prepare_cache()
    assert n == 9 and tr.adapter.n_cache == 8                      # 9 images, batch 4, last batch dropped
    first, second = sum(seen[:2], []), sum(seen[2:], [])
    assert len(seen) == 4 and first != second                      # two shuffled passes
    expected = (base[first] + base[second]) / 2
    torch.testing.assert_close(tr.adapter.weight.detach(), expected / expected.norm(dim=-1, keepdim=True))
    labels = torch.tensor([tr.dm.dataset.train_x[i].label for i in first])   # values: the first pass
    assert torch.equal(tr.adapter.cache_values, torch.nn.functional.one_hot(labels, tr.num_classes).float())
    assert os.listdir(cache) == ["keys_3shotsseed1.pt"]
    vlcs = build(data_root, tmp_path / "v", "TIP_ADAPTER", extra=common, dataset="VLCS")
    vlcs.feature_provider = lambda images, batch: (_ for _ in ()).throw(AssertionError("cache rebuilt"))
    vlcs.prepare_cache()                                           # the PACS keys, as in the official code
    torch.testing.assert_close(vlcs.adapter.weight.detach(), tr.adapter.weight.detach())


# ------------------------------------------------------------------ Tip-Adapter cache files
def test_tip_cache_file_naming_reuse_and_separation(data_root, tmp_path, monkeypatch):
    from trainers.tip_adapter import TIP_ADAPTER

    cache = str(tmp_path / "cache")
    common = FEWSHOT + ["TRAINER.TIP_ADAPTER.CACHE_DIR", cache]
    tr = build(data_root, tmp_path / "o1", "TIP_ADAPTER", extra=common)
    tr.prepare_cache()
    files = os.listdir(cache)
    assert len(files) == 1
    fname = files[0]
    assert fname.startswith("keys_PACS-sketch_tiny-rn-test_3shots_seed1_") and fname.endswith(".pt")
    assert len(fname.split("_")[-1]) == len("12345678.pt")
    mtime = os.stat(os.path.join(cache, fname)).st_mtime_ns

    def boom(self):
        raise AssertionError("cache recomputed")

    monkeypatch.setattr(TIP_ADAPTER, "compute_cache_keys", boom)
    again = build(data_root, tmp_path / "o2", "TIP_ADAPTER", extra=common)
    again.prepare_cache()
    assert os.stat(os.path.join(cache, fname)).st_mtime_ns == mtime
    torch.testing.assert_close(again.adapter.weight, tr.adapter.weight, rtol=0, atol=0)
    monkeypatch.undo()

    other_seed = build(data_root, tmp_path / "o3", "TIP_ADAPTER", extra=common, seed=2)
    other_env = build(data_root, tmp_path / "o4", "TIP_ADAPTER", extra=common + ["TEST_ENV", "photo"])
    vlcs = build(data_root, tmp_path / "o5", "TIP_ADAPTER", extra=common, dataset="VLCS")
    for t in (other_seed, other_env, vlcs):
        t.prepare_cache()
    names = sorted(os.listdir(cache))
    assert len(names) == 4, names
    assert any(n.startswith("keys_PACS-sketch_tiny-rn-test_3shots_seed2_") for n in names)
    assert any(n.startswith("keys_PACS-photo_") for n in names)
    assert any(n.startswith("keys_VLCS-sun_tiny-rn-test_3shots_seed1_") for n in names)
    metas = [torch.load(t.cache_path(), weights_only=False)["meta"] for t in (tr, other_seed, other_env, vlcs)]
    assert metas[0]["train"] != metas[2]["train"] and metas[0]["train"] != metas[3]["train"]
    assert metas[0]["seed"] == 1 and metas[1]["seed"] == 2 and metas[3]["dataset"] == "VLCS"
    # a stale file under the expected name (different content description) is rebuilt, not trusted
    path = tr.cache_path()
    obj = torch.load(path, weights_only=False)
    obj["meta"] = dict(obj["meta"], augment_epoch=99)
    torch.save(obj, path)
    keys, _, _, reused = build(data_root, tmp_path / "o6", "TIP_ADAPTER", extra=common).load_or_build_cache()
    assert not reused
    torch.testing.assert_close(keys, tr.adapter.weight.detach(), rtol=0, atol=0)


def test_tip_cache_build_and_reuse_train_identically(data_root, tmp_path):
    cache = str(tmp_path / "cache")
    extra = FAST + FEWSHOT + ["OPTIM.MAX_EPOCH", "2", "TRAINER.TIP_ADAPTER.CACHE_DIR", cache,
                              "TRAINER.TIP_ADAPTER.AUGMENT_EPOCH", "3", "DATALOADER.TRAIN_X.BATCH_SIZE", "4"]
    recs, weights = [], []
    for run in ("built", "reused"):
        out = str(tmp_path / run)
        recs.append(run_cli(cli_args(data_root, out, "TIP_ADAPTER", config=CONFIGS["TIP_ADAPTER"], extra=extra)))
        weights.append(torch.load(os.path.join(out, "adapter", "model.pth.tar-2"), weights_only=False)["state_dict"])
        log = open(os.path.join(out, "log.txt")).read()
        assert ("Built Tip-Adapter cache" in log) == (run == "built")
        assert ("Loaded Tip-Adapter cache" in log) == (run == "reused")
    assert len(os.listdir(cache)) == 1
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=0)
    assert recs[0]["metrics"]["test"] == recs[1]["metrics"]["test"]
