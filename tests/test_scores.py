"""Tests for the OOD score registry ``dassl.evaluation.scores`` (hand-computed and brute-force expectations)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dassl.engine.ood_eval import check_score_names
from dassl.evaluation import scores as S
from dassl.utils.errors import ConfigError


def test_energy_msp_mcm_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    e = S.energy_score(logits)
    assert e.shape == (2,) and e.dtype == torch.float32
    assert e.tolist() == pytest.approx([math.log(4.0), 2.0 + math.log(2.0)], abs=1e-6)
    e2 = S.energy_score(logits, temperature=2.0)
    assert e2[0].item() == pytest.approx(2.0 * math.log(1.0 + math.sqrt(3.0)), abs=1e-6)
    assert S.msp_score(logits).tolist() == pytest.approx([0.75, 0.5], abs=1e-6)
    cos = torch.tensor([[0.3, 0.2, 0.1]])
    expected = 1.0 / (1.0 + math.exp(-10.0) + math.exp(-20.0))
    assert S.mcm_score(cos, temperature=0.01).item() == pytest.approx(expected, abs=1e-6)
    assert S.mcm_score(cos).item() == pytest.approx(math.exp(0.3) / sum(math.exp(c) for c in (0.3, 0.2, 0.1)))
    big = torch.tensor([[100.0, 90.0]]).half()  # half-precision CLIP-scale logits must not overflow
    assert torch.isfinite(S.energy_score(big)).all()
    with pytest.raises(ValueError):
        S.energy_score(torch.zeros(3))


def test_energy_ignores_minus_inf_padding():
    padded = torch.tensor([[1.0, 2.0, -math.inf]])
    assert S.energy_score(padded).item() == pytest.approx(math.log(math.e + math.e ** 2), abs=1e-6)


def _brute_knn(feats: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    f = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-10)
    b = bank / (np.linalg.norm(bank, axis=1, keepdims=True) + 1e-10)
    d2 = ((f[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return -np.sort(d2, axis=1)[:, k - 1]


@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("batch_size", [7, 4096])
def test_knn_matches_brute_force(k, batch_size):
    rng = np.random.default_rng(k)
    feats, bank = rng.normal(size=(53, 16)), rng.normal(size=(40, 16))
    ref = _brute_knn(feats, bank, k)
    got = S.knn_score(torch.from_numpy(feats), torch.from_numpy(bank), k, batch_size=batch_size)
    assert got.shape == (53,)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10)
    got32 = S.knn_score(torch.from_numpy(feats).float(), torch.from_numpy(bank).float(), k, batch_size=batch_size)
    np.testing.assert_allclose(got32.numpy(), ref, atol=1e-5)
    plain = S.knn_score(torch.from_numpy(feats), torch.from_numpy(bank), k, squared=False)
    np.testing.assert_allclose(plain.numpy(), -np.sqrt(-ref), atol=1e-7)


def test_knn_k_too_large():
    feats, bank = torch.randn(4, 8), torch.randn(5, 8)
    assert S.knn_score(feats, bank, 5).shape == (4,)  # k == len(bank) is fine
    with pytest.raises(ValueError, match="exceeds"):
        S.knn_score(feats, bank, 6)
    with pytest.raises(ValueError, match="dim mismatch"):
        S.knn_score(feats, torch.randn(5, 7), 1)


def test_registry_computes_every_builtin_score():
    torch.manual_seed(0)
    logits = torch.randn(6, 3).double() * 10
    feats, bank = torch.randn(6, 4).double(), torch.randn(9, 4).double()
    inp = S.ScoreInputs(logits=logits, features=feats, bank=bank, logit_scale=10.0, mcm_temperature=0.5, k=3)
    out = S.compute_scores(["energy", "msp", "mcm", "knn"], inp)
    assert list(out) == ["energy", "msp", "mcm", "knn"]
    assert all(v.dtype == np.float64 and v.shape == (6,) for v in out.values())
    np.testing.assert_allclose(out["energy"], torch.logsumexp(logits, 1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(out["msp"], torch.softmax(logits, 1).max(1).values.numpy(), rtol=1e-12)
    np.testing.assert_allclose(out["mcm"], torch.softmax(logits / 10.0 / 0.5, 1).max(1).values.numpy(), rtol=1e-12)
    np.testing.assert_allclose(out["knn"], _brute_knn(feats.numpy(), bank.numpy(), 3), atol=1e-10)
    assert S.score_names()[:4] == ["energy", "mcm", "msp", "knn"]


def test_energy_uses_the_trainers_score_when_set():
    logits = torch.tensor([[1.0, 2.0]])
    own = torch.tensor([7.5])
    assert S.compute_score("energy", S.ScoreInputs(logits=logits, score=own)).tolist() == [7.5]


def test_missing_inputs_and_unknown_names():
    inp = S.ScoreInputs(logits=torch.zeros(2, 3))
    assert S.missing_inputs("knn", inp) == ["features", "bank"]
    assert S.missing_inputs("msp", inp) == []
    with pytest.raises(ValueError, match="needs features, bank"):
        S.compute_score("knn", inp)
    with pytest.raises(ValueError, match="unknown OOD score 'bogus'"):
        S.compute_score("bogus", inp)
    with pytest.raises(ConfigError, match="TEST.OOD_SCORES.*bogus"):
        check_score_names(["energy", "bogus"])
    with pytest.raises(KeyError, match="already registered"):
        S.register_score("energy")(lambda inp: inp.logits[:, 0])
    with pytest.raises(ValueError, match="unknown input"):
        S.register_score("x", needs=("images",))


def test_a_new_score_is_one_registered_function(monkeypatch):
    monkeypatch.setattr(S, "_REGISTRY", dict(S._REGISTRY))  # keep the global registry unchanged

    @S.register_score("my_maxlogit")
    def my_maxlogit(inp: S.ScoreInputs) -> torch.Tensor:
        return inp.logits.max(dim=1).values

    assert "my_maxlogit" in S.score_names() and check_score_names(["my_maxlogit"]) == ["my_maxlogit"]
    got = S.compute_score("my_maxlogit", S.ScoreInputs(logits=torch.tensor([[1.0, 4.0], [3.0, -1.0]])))
    assert got.tolist() == [4.0, 3.0]


def test_the_one_id_filter():
    from dassl.engine.ood_eval import id_keep_mask

    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    labels = np.array([0, 0, 0])
    assert id_keep_mask(logits, labels, True).tolist() == [True, False, True]
    assert id_keep_mask(logits, labels, False).tolist() == [True, True, True]
    assert id_keep_mask(logits, np.array([1, 0, 1]), True).tolist() == [True, True, True]  # none correct: all
