"""The trainer -> evaluator contract ``dassl.engine.inference.InferenceOutput``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dassl.engine.inference import InferenceOutput, as_inference_output
from helpers import cli_args, register_probe_trainer, run_cli
from synthetic import write_lodo_tree
from synthetic_openset import write_all_openset


def test_default_score_is_the_energy_of_the_logits():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, -math.inf]])  # -inf: a padded class adds nothing
    out = InferenceOutput(logits=logits)
    assert out.features is None and out.extras == {}
    assert out.score.tolist() == pytest.approx([math.log(4.0), 1.0], abs=1e-6)
    own = torch.tensor([5.0, 6.0])
    assert InferenceOutput(logits=logits, score=own).score is own


def test_default_score_keeps_float64_and_upcasts_half_precision():
    """A float64 model's energy is float64-accurate; fp16/bf16 logits are upcast to float32 (CLIP-scale logits
    overflow in half precision's exp). Expected: log(e^(100 + 1e-9) + e^100) = 100 + log1p(e^1e-9), by hand."""
    want = 100.0 + math.log1p(math.exp(1e-9))
    score = InferenceOutput(logits=torch.tensor([[100.0 + 1e-9, 100.0]], dtype=torch.float64)).score
    assert score.dtype == torch.float64 and abs(score.item() - want) < 1e-12   # float32: error ~4e-6
    for half in (torch.float16, torch.bfloat16):
        score = InferenceOutput(logits=torch.tensor([[100.0, 100.0]], dtype=half)).score
        assert score.dtype == torch.float32 and score.item() == pytest.approx(100.0 + math.log(2.0), abs=1e-5)
    assert InferenceOutput(logits=torch.zeros(1, 2)).score.dtype == torch.float32


def test_shapes_are_checked():
    with pytest.raises(TypeError, match=r"logits must be an \(N, C\) tensor"):
        InferenceOutput(logits=torch.zeros(3))
    with pytest.raises(TypeError, match="features must be a tensor with 2 rows"):
        InferenceOutput(logits=torch.zeros(2, 3), features=torch.zeros(3, 4))
    with pytest.raises(TypeError, match="score must be a tensor with 2 rows and 1 dims"):
        InferenceOutput(logits=torch.zeros(2, 3), score=torch.zeros(2, 1))
    with pytest.raises(TypeError, match=r"extras\['txt'\] must be a tensor with 2 rows"):
        InferenceOutput(logits=torch.zeros(2, 3), extras={"txt": torch.zeros(7, 4)})


def test_positional_lists_are_refused_and_bare_logits_wrapped():
    logits = torch.randn(4, 3)
    with pytest.raises(TypeError, match="returned a list; return dassl.engine.inference.InferenceOutput"):
        as_inference_output([logits, logits, torch.logsumexp(logits, 1)])
    wrapped = as_inference_output(logits)
    assert wrapped.logits is logits and torch.equal(wrapped.score, torch.logsumexp(logits, 1))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_data")
    write_lodo_tree(str(root), per_class=4)
    write_all_openset(str(root))
    return str(root)


def _eval_probe(root: str, out: str) -> dict:
    register_probe_trainer()
    return run_cli(cli_args(root, out, "TestProbe", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                            flags=["--eval-only"],
                            extra=["TEST.OOD_SCORES", "['energy', 'msp', 'mcm', 'knn']", "TEST.MCM_TEMPERATURE",
                                   "0.5", "TEST.OOD_ID_CORRECT_ONLY", "False"]))


def test_a_trainer_returning_only_logits_evaluates_with_energy_msp_mcm(data_root, tmp_path, capsys):
    rec = _eval_probe(data_root, str(tmp_path / "ev"))
    det = rec["metrics"]["ood"]
    assert set(det) == {"energy", "msp", "mcm"}  # knn needs features: skipped with a note
    assert "knn score skipped" in capsys.readouterr().out
    z = np.load(tmp_path / "ev" / "scores.npz")
    assert "test__features" not in z.files
    id_logits, ood_logits = z["test__logits"].astype(np.float64), z["ood_test__logits"].astype(np.float64)

    def lse(x):
        m = x.max(1, keepdims=True)
        return (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0]

    def max_softmax(x):
        return np.exp(x.max(1) - lse(x))

    scale = 100.0  # TestProbe has no logit_scale attribute: the engine's default s
    expected = {"energy": lse, "msp": max_softmax, "mcm": lambda x: max_softmax(x / scale / 0.5)}
    for name, fn in expected.items():
        s_id, s_ood = fn(id_logits), fn(ood_logits)
        np.testing.assert_allclose(z[f"test__score_{name}"], s_id, rtol=1e-6)
        truth = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
        assert det[name]["auroc"] == pytest.approx(roc_auc_score(truth, np.r_[s_id, s_ood]), abs=1e-9)
        assert det[name]["num_id"] == len(s_id) and det[name]["num_ood"] == len(s_ood)


def test_a_trainer_returning_a_list_fails_with_a_clear_error(data_root, tmp_path):
    cls = register_probe_trainer()

    class ListProbe(cls):
        def model_inference(self, input):
            logits = self.model(self.encode_images(input))
            return [logits, torch.logsumexp(logits, 1)]

    from dassl.engine import TRAINER_REGISTRY

    if "ListProbe" not in TRAINER_REGISTRY:
        TRAINER_REGISTRY.register(ListProbe)
    with pytest.raises(TypeError, match="ListProbe.model_inference returned a list"):
        run_cli(cli_args(data_root, str(tmp_path / "ev"), "ListProbe", flags=["--eval-only"]))


def test_extras_reach_the_scores_and_scores_npz(data_root, tmp_path, monkeypatch):
    from dassl.engine import TRAINER_REGISTRY
    from dassl.evaluation import scores as S

    cls = register_probe_trainer()

    class ExtrasProbe(cls):
        def model_inference(self, input):
            logits = self.model(self.encode_images(input))
            return InferenceOutput(logits=logits, extras={"top": logits.max(dim=1).values})

    if "ExtrasProbe" not in TRAINER_REGISTRY:
        TRAINER_REGISTRY.register(ExtrasProbe)
    monkeypatch.setattr(S, "_REGISTRY", dict(S._REGISTRY))  # the test score stays local to this test
    S.register_score("top_logit", needs=("logits",))(lambda inp: inp.extras["top"])
    out = tmp_path / "ev"
    rec = run_cli(cli_args(data_root, str(out), "ExtrasProbe", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                           flags=["--eval-only"], extra=["TEST.OOD_SCORES", "['top_logit']",
                                                         "TEST.OOD_ID_CORRECT_ONLY", "False"]))
    z = np.load(out / "scores.npz")
    np.testing.assert_allclose(z["test__extra_top"], z["test__logits"].max(1), rtol=1e-6)
    np.testing.assert_allclose(z["test__score_top_logit"], z["test__logits"].max(1), rtol=1e-6)
    truth = np.r_[np.ones(len(z["test__labels"])), np.zeros(len(z["ood_test__labels"]))]
    expected = roc_auc_score(truth, np.r_[z["test__logits"].max(1), z["ood_test__logits"].max(1)])
    assert rec["metrics"]["ood"]["top_logit"]["auroc"] == pytest.approx(expected, abs=1e-9)
