"""OpenOOD v1.5's post-hoc scores (``dassl/evaluation/openood_scores.py``) and fitted scores in evaluation runs.

Each score equals an independent numpy / scipy / scikit-learn implementation of OpenOOD's postprocessor formula
on random inputs (written here from ``maxlogit_postprocessor.py``, ``gen_postprocessor.py``,
``temp_scaling_postprocessor.py``, ``mds_postprocessor.py``, ``vim_postprocessor.py``,
``residual_postprocessor.py``) and a hand-computed case; fitted statistics come from the training split only and
are fitted once per model, also over several open sets (``train.py --eval-open-set``).
"""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance

from dassl.evaluation import openood_scores as O
from dassl.evaluation import scores as S
from helpers import assert_ood_matches_scores, run_cli

NEW = ("maxlogit", "gen", "temp_msp", "mahalanobis", "vim", "residual")
FITTED = ("temp_msp", "mahalanobis", "vim", "residual")
TOL = dict(rtol=1e-9, atol=1e-9)  # float64 on both sides; only summation order differs


def _clip_like(n, d=8, c=4, seed=0, scale=100.0):
    """Normalised features, a bias-free CLIP head W = s T (OpenOOD's fc with b = 0) and its logits."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)) * np.linspace(2.0, 0.5, d)  # distinct variances: a well-defined subspace
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    text = rng.normal(size=(c, d))
    w = scale * text / np.linalg.norm(text, axis=1, keepdims=True)
    return feats, w, np.zeros(c), feats @ w.T


def _inputs(feats, logits, labels=None, **kw):
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    return S.ScoreInputs(logits=t(logits), features=t(feats),
                         labels=None if labels is None else torch.from_numpy(np.asarray(labels)).long(), **kw)


def _score(name, train, test):
    test.fitted = {name: S.fit_score(name, train)} if S.fit_needs(name) else {}
    return S.compute_score(name, test)


# ------------------------------------------------------------------------------------------------ registry


def test_registered_with_their_fits():
    assert set(NEW) <= set(S.score_names())
    assert {n for n in NEW if S.fit_needs(n)} == set(FITTED)
    assert S.fit_needs("mahalanobis") == ("features", "labels") and S.fit_needs("temp_msp") == ("logits", "labels")
    assert S.fit_needs("vim") == ("logits", "features") and S.fit_needs("residual") == ("features",)
    feats, _, _, logits = _clip_like(5)
    with pytest.raises(ValueError, match="needs statistics of the ID training split"):
        S.compute_score("vim", _inputs(feats, logits))
    with pytest.raises(ValueError, match="its fit needs the training split's labels"):
        S.fit_score("mahalanobis", _inputs(feats, logits))
    with pytest.raises(ValueError, match="fit_needs"):
        S.register_score("bad_fit", fit=lambda t: None)
    with pytest.raises(ValueError, match="fit_needs"):
        S.register_score("bad_fit2", fit=lambda t: None, fit_needs=("bank",))


# ------------------------------------------------------------------------------------------------ hand-computed


def test_maxlogit_and_gen_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # softmax (1/4, 3/4)
    assert O.maxlogit_score(logits).item() == pytest.approx(math.log(3.0))
    assert O.gen_score(logits).item() == pytest.approx(-2 * (3 / 16) ** 0.1, abs=1e-12)  # gamma 0.1, M 100 >= C
    assert O.gen_score(logits, gamma=1.0, m=1).item() == pytest.approx(-3 / 16, abs=1e-12)  # top-1 only


def test_mahalanobis_by_hand():
    # 1-D: class 0 at {0, 2} (mean 1), class 1 at {10, 12} (mean 11); centred data +-1: variance 1, precision 1
    train = _inputs(np.array([[0.0], [2.0], [10.0], [12.0]]), np.zeros((4, 2)), np.array([0, 0, 1, 1]))
    test = _inputs(np.array([[3.0], [8.0]]), np.zeros((2, 2)))
    assert _score("mahalanobis", train, test).tolist() == pytest.approx([-4.0, -9.0])  # nearest means 1 and 11


def test_residual_and_vim_by_hand():
    # train variance 10/6 along x, 0.5/6 along y: dim 1 keeps x, the residual is |y|
    feats = np.array([[1, 0], [-1, 0], [2, 0], [-2, 0], [0, 0.5], [0, -0.5]], dtype=float)
    train = _inputs(feats, np.tile([2.0, 1.0], (6, 1)), vim_dim=1, residual_dim=1)
    test = _inputs(np.array([[3.0, 4.0]]), np.array([[0.0, 0.0]]), vim_dim=1, residual_dim=1)
    assert _score("residual", train, test).tolist() == pytest.approx([-4.0])
    # alpha = mean max logit (2) / mean train residual (1/6) = 12; ViM = logsumexp(0, 0) - 12 * 4
    assert S.fit_score("vim", train).alpha == pytest.approx(12.0)
    assert _score("vim", train, test).tolist() == pytest.approx([math.log(2.0) - 48.0])


def test_temp_msp_by_hand():
    """With the fitted T the score is max softmax(logits / T), here for two classes 1 / (1 + exp(-d / T))."""
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    train = _inputs(None, logits, np.array([0, 0, 1, 1]))
    t = S.fit_score("temp_msp", train).temperature
    test = _inputs(None, np.array([[1.0, 0.0]]))
    assert _score("temp_msp", train, test).tolist() == pytest.approx([1 / (1 + math.exp(-1 / t))], abs=1e-6)


# ------------------------------------------------------------------------------------------------ vs OpenOOD formula


def test_maxlogit_gen_match_openood_on_random_logits():
    logits = np.random.default_rng(1).normal(scale=5.0, size=(50, 12))
    x = torch.from_numpy(logits)
    np.testing.assert_allclose(O.maxlogit_score(x).numpy(), logits.max(-1), **TOL)
    for gamma, m in ((0.1, 100), (0.5, 5), (2.0, 1)):  # M above, inside and at the edge of the class count
        p = np.sort(softmax(logits, axis=1), axis=1)[:, -m:]
        ref = -np.sum(p ** gamma * (1 - p) ** gamma, axis=1)
        got = S.compute_score("gen", S.ScoreInputs(logits=x, gen_gamma=gamma, gen_m=m))
        np.testing.assert_allclose(got, ref, **TOL)


def _openood_temperature(logits, labels):
    """OpenOOD's TemperatureScalingPostprocessor.setup, on the CPU: T = 1.5, LBFGS(lr=0.01, max_iter=50)."""
    temperature = torch.nn.Parameter(torch.ones(1) * 1.5)
    nll = torch.nn.CrossEntropyLoss()
    x, y = torch.from_numpy(logits).float(), torch.from_numpy(labels).long()
    opt = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

    def closure():
        opt.zero_grad()
        loss = nll(x / temperature, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(temperature.item())


def test_temp_msp_matches_openood_on_random_logits():
    feats, _, _, logits = _clip_like(200, seed=2, scale=20.0)
    labels = np.random.default_rng(2).integers(0, 4, size=200)  # noisy labels: the NLL prefers a higher T
    ref_t = _openood_temperature(logits, labels)
    stats = S.fit_score("temp_msp", _inputs(feats, logits, labels))
    # the same float32 recipe, one CPU: tolerance for reordered float32 sums across BLAS builds
    assert stats.temperature == pytest.approx(ref_t, rel=1e-4) and abs(ref_t - 1.5) > 1e-2
    test = _inputs(feats[:20], logits[:20])
    test.fitted = {"temp_msp": stats}
    np.testing.assert_allclose(S.compute_score("temp_msp", test), softmax(logits[:20] / stats.temperature, 1).max(1),
                               **TOL)


def test_temp_msp_fit_ignores_padded_classes():
    """Padded (-inf) classes, e.g. DPLCLIP's ragged logits, change neither the fit nor the score."""
    feats, _, _, logits = _clip_like(60, seed=3, scale=10.0)
    labels = np.random.default_rng(3).integers(0, 4, size=60)
    padded = np.concatenate([logits, np.full((60, 2), -np.inf)], axis=1)
    t_plain = S.fit_score("temp_msp", _inputs(feats, logits, labels)).temperature
    t_pad = S.fit_score("temp_msp", _inputs(feats, padded, labels)).temperature
    assert math.isfinite(t_pad) and t_pad == pytest.approx(t_plain, rel=1e-6)


def test_mahalanobis_matches_openood_on_random_features():
    feats, _, _, logits = _clip_like(300, d=6, c=3, seed=4)
    labels = np.random.default_rng(4).integers(0, 3, size=300)
    means = np.stack([feats[labels == c].mean(0) for c in range(3)])
    centred = np.concatenate([feats[labels == c] - means[c] for c in range(3)])
    precision = EmpiricalCovariance(assume_centered=False).fit(centred).precision_
    test = np.random.default_rng(5).normal(size=(40, 6))
    ref = np.max([-np.einsum("nd,de,ne->n", test - m, precision, test - m) for m in means], axis=0)
    got = _score("mahalanobis", _inputs(feats, logits, labels), _inputs(test, np.zeros((40, 3))))
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-8)  # pinvh (scipy) vs pinv (torch) of a well-posed cov


def _openood_subspace(train_feats, w, b, dim):
    """vim/residual_postprocessor.setup: u = -pinv(w) b, eigenvectors of EmpiricalCovariance(centred=True)."""
    u = -np.matmul(np.linalg.pinv(w), b)
    cov = EmpiricalCovariance(assume_centered=True).fit(train_feats - u).covariance_
    vals, vecs = np.linalg.eig(cov)
    ns = np.ascontiguousarray((vecs.T[np.argsort(vals * -1)[dim:]]).T)
    return u, np.real_if_close(ns)


@pytest.mark.parametrize("dim", [1, 3, 6])
def test_vim_and_residual_match_openood_on_random_features(dim):
    feats, w, b, logits = _clip_like(400, d=8, seed=6)
    test_feats, _, _, _ = _clip_like(30, d=8, seed=7)
    test_logits = test_feats @ w.T + b
    u, ns = _openood_subspace(feats, w, b, dim)
    assert np.array_equal(u, np.zeros(8))  # CLIP's head has no bias: the origin is 0
    alpha = logits.max(-1).mean() / np.linalg.norm((feats - u) @ ns, axis=-1).mean()
    ref_vim = -np.linalg.norm((test_feats - u) @ ns, axis=-1) * alpha + logsumexp(test_logits, axis=-1)
    ref_res = -np.linalg.norm((test_feats - u) @ ns, axis=-1)
    train = _inputs(feats, logits, vim_dim=dim, residual_dim=dim)
    test = _inputs(test_feats, test_logits, vim_dim=dim, residual_dim=dim)
    assert S.fit_score("vim", train).alpha == pytest.approx(alpha, rel=1e-9)
    np.testing.assert_allclose(_score("vim", train, test), ref_vim, rtol=1e-8, atol=1e-8)  # eig vs eigh bases
    np.testing.assert_allclose(_score("residual", train, test), ref_res, rtol=1e-8, atol=1e-8)


def test_subspace_dim_must_be_below_the_feature_dim():
    feats, _, _, logits = _clip_like(20, d=8)
    with pytest.raises(ValueError, match=r"must be in \[1, 7\]"):
        S.fit_score("residual", _inputs(feats, logits, residual_dim=8))


# ------------------------------------------------------------------------------------------------ evaluation wiring


class _Outputs:
    """A trainer whose split outputs are fixed arrays (what the evaluator reads), with a training split."""

    def __init__(self, cfg, tmp_path, test_seed=0, train_seed=10):
        cfg.OUTPUT_DIR = str(tmp_path)
        self.cfg = cfg
        self.dm = SimpleNamespace(dataset=SimpleNamespace(train_x=[object()]))
        self.split = {}
        for split, n, seed in (("train", 120, train_seed), ("test", 30, test_seed), ("val", 20, test_seed + 1),
                               ("ood_test", 25, test_seed + 2)):
            feats, _, _, logits = _clip_like(n, seed=seed)
            labels = logits.argmax(1) if split != "ood_test" else -np.ones(n, int)
            self.split[split] = {"logits": logits, "labels": labels, "features": feats}
        self.calls = []
        self.val_loader = self.ood_test_loader = object()

    def test(self, split="test"):
        return {"accuracy": 0.0}

    def collect_outputs(self, split):
        self.calls.append(split)
        return {k: v.copy() for k, v in self.split[split].items()}

    def logit_scale_value(self):
        return 100.0


def _cfg(scores=NEW):
    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    cfg.TEST.OOD_SCORES = scores
    cfg.TEST.VIM_DIM, cfg.TEST.RESIDUAL_DIM, cfg.TEST.SAVE_SCORES = 4, 4, False
    return cfg


def test_fit_comes_from_the_training_split_only(tmp_path):
    from dassl.engine.ood_eval import run_evaluation

    base = _Outputs(_cfg(), tmp_path)
    det = run_evaluation(base)["ood"]
    assert base.calls.count("train") == 1 and set(det) == set(NEW)
    assert {n for n in det if "fit" in det[n]} == set(FITTED) and det["vim"]["fit"]["images"] == 120
    # other test / val / open-set data: the same statistics; other training data: different ones
    other_test = run_evaluation(_Outputs(_cfg(), tmp_path, test_seed=50))["ood"]
    other_train = run_evaluation(_Outputs(_cfg(), tmp_path, train_seed=60))["ood"]
    assert other_test["vim"]["fit"] == det["vim"]["fit"] and other_test["temp_msp"]["fit"] == det["temp_msp"]["fit"]
    assert other_train["vim"]["fit"]["alpha"] != det["vim"]["fit"]["alpha"]
    # the ID side's scores are those of statistics fitted on the training arrays (sklearn reference)
    tr, te = base.split["train"], base.split["test"]
    means = np.stack([tr["features"][tr["labels"] == c].mean(0) for c in range(4)])
    prec = EmpiricalCovariance().fit(tr["features"] - means[tr["labels"]]).precision_
    ref = np.max([-np.einsum("nd,de,ne->n", te["features"] - m, prec, te["features"] - m) for m in means], 0)
    keep = te["logits"].argmax(1) == te["labels"]
    from sklearn.metrics import roc_auc_score

    ood_ref = np.max([-np.einsum("nd,de,ne->n", base.split["ood_test"]["features"] - m, prec,
                                 base.split["ood_test"]["features"] - m) for m in means], 0)
    truth = np.r_[np.ones(keep.sum()), np.zeros(25)]
    assert det["mahalanobis"]["auroc"] == pytest.approx(roc_auc_score(truth, np.r_[ref[keep], ood_ref]), abs=1e-12)


def test_defaults_are_openoods():
    """gen.yml (gamma 0.1, M 100), vim.yml (dim 256), residual.yml (dim 512) of OpenOOD v1.5."""
    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    assert (cfg.TEST.GEN_GAMMA, cfg.TEST.GEN_M, cfg.TEST.VIM_DIM, cfg.TEST.RESIDUAL_DIM) == (0.1, 100, 256, 512)
    assert cfg.TEST.OOD_SCORES == ("energy", "mcm", "msp", "knn")  # the defaults stay the paper's four
    assert (S.ScoreInputs().gen_gamma, S.ScoreInputs().gen_m) == (0.1, 100)


def test_training_pass_keeps_the_random_state(tmp_path):
    from dassl.engine.score_fit import training_split

    class Drawing(_Outputs):
        def collect_outputs(self, split):
            torch.rand(3), np.random.rand(), __import__("random").random()  # as loaders and augmentations do
            return super().collect_outputs(split)

    import random

    tr = Drawing(_cfg(), tmp_path)
    torch.manual_seed(0)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    out = training_split(tr)
    assert out["features"].shape == (120, 8) and tr.calls == ["train"]
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
    torch.rand(3)
    assert not torch.equal(torch.get_rng_state(), before[0])  # (the check can fail)


def test_no_training_pass_unless_a_fitted_score_is_requested(tmp_path):
    from dassl.engine.ood_eval import run_evaluation

    tr = _Outputs(_cfg(("energy", "maxlogit", "gen")), tmp_path)
    run_evaluation(tr)
    assert "train" not in tr.calls


def test_dims_at_or_above_the_feature_dim_are_one_config_error(tmp_path):
    from dassl.engine.ood_eval import run_evaluation
    from dassl.utils.errors import ConfigError

    cfg = _cfg(("energy", "vim"))
    cfg.TEST.VIM_DIM = 8  # features are 8-D
    tr = _Outputs(cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"TEST.VIM_DIM 8 must be smaller than the feature dimension 8"):
        run_evaluation(tr)
    assert "train" not in tr.calls  # refused before the training pass


def test_a_model_without_features_skips_feature_scores_with_a_note(tmp_path, capsys):
    from dassl.engine.ood_eval import run_evaluation

    tr = _Outputs(_cfg(("energy", "mahalanobis", "temp_msp")), tmp_path)
    for out in tr.split.values():
        del out["features"]
    det = run_evaluation(tr)["ood"]
    assert set(det) == {"energy", "temp_msp"} and det["temp_msp"]["fit"]["images"] == 120
    assert "Note: mahalanobis score skipped" in capsys.readouterr().out


def test_the_documented_fitted_score_example(tmp_path, monkeypatch):
    """docs/extending.md's example: registered with its fit, it is fitted on the training split and recorded."""
    from dassl.engine.ood_eval import run_evaluation

    monkeypatch.setattr(S, "_REGISTRY", dict(S._REGISTRY))  # keep the global registry unchanged

    def fit_centre(train):
        return train.features.mean(dim=0)

    @S.register_score("centre_dist", needs=("features",), fit=fit_centre, fit_needs=("features",))
    def centre_dist(inp):
        return -(inp.features - inp.fitted["centre_dist"]).norm(dim=1)

    tr = _Outputs(_cfg(("centre_dist",)), tmp_path)
    det = run_evaluation(tr)["ood"]["centre_dist"]
    assert det["fit"] == {"split": "train", "images": 120}
    centre = tr.split["train"]["features"].mean(0)
    from sklearn.metrics import roc_auc_score

    id_s = -np.linalg.norm(tr.split["test"]["features"] - centre, axis=1)
    ood_s = -np.linalg.norm(tr.split["ood_test"]["features"] - centre, axis=1)
    assert det["auroc"] == pytest.approx(roc_auc_score(np.r_[np.ones(30), np.zeros(25)], np.r_[id_s, ood_s]),
                                         abs=1e-12)


def test_no_training_split_skips_fitted_scores_with_a_note(tmp_path, capsys):
    from dassl.engine.ood_eval import run_evaluation

    tr = _Outputs(_cfg(("energy", "mahalanobis")), tmp_path)
    tr.dm.dataset.train_x = []
    det = run_evaluation(tr)["ood"]
    assert set(det) == {"energy"} and "train" not in tr.calls
    assert "Note: mahalanobis score skipped" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ end to end

ZS = ["--trainer", "ZeroshotCLIP", "--config-file", "configs/trainers/ZeroshotCLIP/rn50_ep30.yaml", "--seed", "1",
      "--eval-only"]
TINY = ["MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DEVICE", "cpu", "TEST_ENV", "sketch", "DATALOADER.OOD_TEST.TRANSFORM", "test",
        "TEST.SAVE_PLOTS", "False", "TEST.VIM_DIM", "8", "TEST.RESIDUAL_DIM", "12"]
SCORES = ["TEST.OOD_SCORES", "('energy', " + ", ".join(f"'{s}'" for s in NEW) + ")"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from synthetic import write_lodo_tree
    from synthetic_openset import write_all_openset

    root = tmp_path_factory.mktemp("oo_data")
    write_lodo_tree(str(root), per_class=3)  # 3 source domains x 3 classes x (3 - 1 json val) = 18 train images
    write_all_openset(str(root))
    return str(root)


def _rec(d):
    with open(os.path.join(d, "record.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def evaluated(data, tmp_path_factory):
    """ZS-CLIP on PACS_DTD: energy only, and energy + every new score (under ``eval/`` for the collector)."""
    base = tmp_path_factory.mktemp("oo_runs")
    args = ["--root", data, *ZS, "--dataset-config-file", "configs/datasets/PACS_DTD.yaml", "--output-dir"]
    plain = run_cli([*args, str(base / "plain"), *TINY, "TEST.OOD_SCORES", "('energy',)"])
    out = str(base / "eval" / "ZeroshotCLIP" / "PACS_DTD")
    return plain, run_cli([*args, out, *TINY, *SCORES]), out


def test_eval_run_writes_every_new_score(data, evaluated):
    base, rec, out = evaluated
    assert set(rec["metrics"]["ood"]) == {"energy", *NEW}
    assert_ood_matches_scores(out, rec, ("energy", *NEW))  # AUROC recomputed by scikit-learn from scores.npz
    with np.load(os.path.join(out, "scores.npz")) as z:
        for name in NEW:
            assert {f"{s}__score_{name}" for s in ("test", "val", "ood_test")} <= set(z.files)
        assert not any(k.startswith("train__") for k in z.files)  # the training split is not saved
    # one training pass (the json train list, test transform), counted in the record; the other scores unchanged
    with open(os.path.join(data, "PACS", "test_on_sketch.json")) as f:
        n_train = len(json.load(f)["train"])
    assert n_train == 18 and rec["timings"]["encoder_images"] == base["timings"]["encoder_images"] + n_train
    assert all(rec["metrics"]["ood"][n]["fit"]["images"] == n_train for n in FITTED)
    assert rec["metrics"]["ood"]["vim"]["fit"]["dim"] == 8 and rec["metrics"]["ood"]["residual"]["fit"]["dim"] == 12
    assert rec["metrics"]["ood"]["energy"] == base["metrics"]["ood"]["energy"]
    assert rec["protocol"]["fpr95_convention"]["mahalanobis"] == "fpr95_tpr_ood"


def test_one_pass_over_two_open_sets_fits_once(data, tmp_path):
    sep = str(tmp_path / "sep")
    run_cli(["--root", data, *ZS, "--dataset-config-file", "configs/datasets/PACS_Caltech101.yaml",
             "--output-dir", sep, *TINY, *SCORES])
    pairs = [a for o in ("DTD", "Caltech101") for a in ("--eval-open-set", f"configs/datasets/PACS_{o}.yaml",
                                                         str(tmp_path / "one" / o))]
    run_cli(["--root", data, *ZS, *pairs, *TINY, *SCORES])
    first, second = _rec(tmp_path / "one" / "DTD"), _rec(tmp_path / "one" / "Caltech101")
    # the second run encodes only its open-set images: the training split was fitted once, by the first run
    assert second["timings"]["encoder_images"] == second["metrics"]["ood"]["energy"]["num_ood"]
    assert first["metrics"]["ood"]["vim"]["fit"] == second["metrics"]["ood"]["vim"]["fit"]
    # ... and the second run equals its separate run (same process and batching: bitwise)
    with np.load(os.path.join(sep, "scores.npz")) as a, np.load(tmp_path / "one" / "Caltech101" / "scores.npz") as b:
        for name in NEW:
            for split in ("test", "val", "ood_test"):
                assert np.array_equal(a[f"{split}__score_{name}"], b[f"{split}__score_{name}"]), (name, split)


def test_training_pass_goes_through_the_feature_cache(data, tmp_path):
    cache = ["FEATURE_CACHE.ENABLED", "True", "FEATURE_CACHE.DIR", str(tmp_path / "feat")]
    args = ["--root", data, *ZS, "--dataset-config-file", "configs/datasets/PACS_DTD.yaml"]
    first = run_cli([*args, "--output-dir", str(tmp_path / "c1"), *TINY, *SCORES, *cache])
    again = run_cli([*args, "--output-dir", str(tmp_path / "c2"), *TINY, *SCORES, *cache])
    assert first["timings"]["encoder_images"] > 0 and again["timings"]["encoder_images"] == 0
    assert again["feature_cache"]["hits"] == first["feature_cache"]["hits"] > 0
    for name in FITTED:
        assert again["metrics"]["ood"][name] == first["metrics"]["ood"][name]


def test_collectors_and_figures_take_the_new_scores(evaluated, tmp_path, capsys):
    import csv

    from launch import collect

    root = os.path.dirname(os.path.dirname(evaluated[2]))
    capsys.readouterr()
    assert collect.main("oodd", ["--root", str(root), "--scores", "vim", "mahalanobis", "energy", "--select",
                                 "none"]) == 0
    text = capsys.readouterr().out
    for name, key in (("vim", "fpr95_tpr_ood"), ("mahalanobis", "fpr95_tpr_ood"), ("energy", "fpr95_id_percentile")):
        assert f"#### score `{name}`: FPR95 = `{key}`" in text
    assert text.index("#### score `vim`") < text.index("#### score `mahalanobis`") < text.index("#### score `energy`")
    with open(os.path.join(root, "setup2_oodd.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["score"] == "vim" and r["ood"] == "DTD"]
    rec = evaluated[1]
    got = {r["metric"]: float(r["mean"]) for r in rows}
    assert {r["fpr95"] for r in rows} == {"fpr95_tpr_ood"}
    assert got == pytest.approx({"fpr95": 100 * rec["metrics"]["ood"]["vim"]["fpr95_tpr_ood"],
                                 "auroc": 100 * rec["metrics"]["ood"]["vim"]["auroc"]}, abs=1e-3)
    # --plots: histograms and ROC curves per --scores entry (runs listed in a sweep manifest, as drivers write it)
    labels = {"kind": "eval", "method": "ZeroshotCLIP", "setting": "", "dataset": "PACS", "domain": "sketch",
              "seed": 1, "ood": "DTD"}
    os.makedirs(os.path.join(root, "sweeps"), exist_ok=True)
    with open(os.path.join(root, "sweeps", "zs.json"), "w") as f:
        json.dump({"sweep": "zs", "jobs": [{"name": "zs", "output_dir": evaluated[2], "labels": labels}]}, f)
    fig = tmp_path / "fig"
    assert collect.main("oodd", ["--root", root, "--scores", "residual", "gen", "--plots", str(fig)]) == 0
    assert sorted(os.listdir(fig)) == ["hist_gen.png", "hist_residual.png", "roc_gen.png", "roc_residual.png"]
    assert all((fig / p).read_bytes()[:4] == b"\x89PNG" for p in os.listdir(fig))
