"""Golden parity of DPLCLIP with numbers from the official code (``fixtures/BASELINES.md`` §5.5, §7.5).

Every ``DPLCLIP`` case of ``$BASELINES_FIXTURE`` is replayed through the project's real trainer
(:mod:`baseline_golden`): the case's tiny CLIP, images, class and domain names, MLP width/depth/dropout,
``build_trainer``, ``init__*`` loaded by name, one ``update_lr`` before step 0, every step through
``forward_backward``, evaluation through ``parse_batch_test`` and ``model_inference`` before and after the steps.
The recorded dropout keep-masks are handed to the MLP's dropout through its ``mask_source`` (the trainer's mask
draw), call by call. The trainer keeps the loader's row order; its domain grouping (``domain_groups``) gives the
official row order, which is checked against the fixture's and used to compare row-wise arrays. Compared
norm-wise (``max|a-b|/max|ref|``; 1e-10 in float64, 5e-5 in float32): encoder features, the groups, the reordered
labels, text features of step 0, per step the concatenated logits (N x G·C, labels 0..C-1), energy, loss,
accuracy, learning rates, raw gradients and parameters (full, or sampled entries and norms of large tensors),
and evaluation logits and energies with contexts from the evaluation batch's own domains. The mutation tests show
that the named fixes (``LOGITS per_group``, ``DOMAIN_POOL mlp_of_mean``, ``TEST_GROUP_BY_DOMAIN False`` where the
evaluation batch holds several domains), ignoring dropout and another weight decay leave the golden numbers.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

import baseline_golden as bg
from baseline_golden import one, one_thread  # noqa: F401  (one_thread: autouse fixture)

METHOD = "DPLCLIP"
FIXTURE = bg.load_fixture()
CASES = [c.key for c in FIXTURE.cases((METHOD,))]
DTYPES = {"float64": torch.float64, "float32": torch.float32}
INPUT_ARRAYS = ("method", "dataset_name", "trainer_config", "backbone_name", "clip_key", "seed", "classnames",
                "alldomain", "opts", "param_names", "X_train_uint8", "y_train", "d_train", "X_eval_uint8", "y_eval",
                "d_eval", "pixel_mean", "pixel_std", "dropout_keep_flat", "dropout_call_rows")
INPUT_PREFIXES = ("init__", "sample_idx__")


Replay = bg.Replay


def add(errors: bg.Errors, name: str, ours: Any, ref: Any) -> None:
    """``errors.add``, with a shape mismatch counted as an infinite error (a mutation may change shapes)."""
    try:
        errors.add(name, ours, ref)
    except AssertionError:
        errors.add_value(name, float("inf"))


def static_checks(tr: Any, case: bg.Case, errors: bg.Errors) -> None:
    """Prompt tokens, MLP shape and dropout, registered module, optimiser, images."""
    mlp = tr.mlp
    errors.add("tokenized_prompts", tr.prompt_tokens.tokenized_prompts, case["tokenized_prompts"])
    errors.add("n_ctx", tr.prompt_tokens.n_ctx, case["n_ctx"])
    errors.add("mlp_width", mlp.input.out_features, case["mlp_width"])
    errors.add("mlp_depth", len(mlp.hiddens) + 2, case["mlp_depth"])
    errors.add("mlp_dropout", mlp.dropout.p, case["mlp_dropout"])
    errors.add_flag("registered_models", tr.get_model_names() == case.strings("registered_models"))
    bg.check_inputs(errors, case)
    errors.add("base_lr", tr.cfg.OPTIM.LR, case["base_lr"])
    errors.add("max_epoch", tr.cfg.OPTIM.MAX_EPOCH, case["max_epoch"])
    bg.check_optimiser(errors, tr, case)


def instrument(rec: bg.Recorder, tr: Any) -> None:
    rec.method("image", tr, "image_features")
    rec.method("groups", tr, "domain_groups")
    rec.method("logits", tr, "forward_logits")
    rec.module("text", tr.text_encoder)


def grouping(rec: bg.Recorder) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's groups (domains present, ascending) and the official row order (rows group by group)."""
    present, groups = one(rec.take("groups"))
    return present, torch.argsort(groups, stable=True)


def record_step(tr: Any, case: bg.Case, k: int, dtype: torch.dtype, rec: bg.Recorder, params: dict,
                replay: Replay) -> None:
    from dassl.evaluation.scores import energy_score

    r = bg.train_step(tr, case, k, dtype, params)
    present, order = grouping(rec)
    logits = one(rec.take("logits"))
    _, raw = one(rec.take("image"))
    text = one(rec.take("text"))
    label = case.tensor("y_train")[k].long()
    values = {"step_loss": r["summary"]["loss"], "step_acc": r["summary"]["acc"], "step_logits": logits[order],
              "step_energy": energy_score(logits)[order], "step_label_new": label[order], "step_row_order": order,
              "step_group_domains": present, "enc_img_feat_train": raw[order]}
    if k == 0:
        add(replay.group("steps"), "step0_text_feat_raw", text, case["step0_text_feat_raw"])
    steps = replay.group("steps")
    for lr in r["lrs"]:       # every optimiser
        steps.add("lr_used", lr, case["lr_used"][k])
    for name, value in values.items():
        add(steps, name, torch.as_tensor(value).detach(), case[name][k])
    for name in params:       # judged per array over all steps (BASELINES.md section 1)
        has = r["grad"][name] is not None
        steps.add_flag(f"has_grad__{name}", has == bool(case[f"has_grad__{name}"][k]))
        if has:
            steps.add_snapshot(case, name, "grad", k, r["grad"][name])
        steps.add_snapshot(case, name, "param", k, r["param"][name])


def compare_eval(tr: Any, case: bg.Case, dtype: torch.dtype, rec: bg.Recorder, replay: Replay, when: str) -> None:
    """Evaluation through ``parse_batch_test`` (which passes the domain labels on) and ``model_inference``."""
    from dassl.evaluation.scores import energy_score

    batch = {"img": case.tensor("X_eval", dtype), "label": case.tensor("y_eval").long(),
             "domain": case.tensor("d_eval").long()}
    images, label = tr.parse_batch_test(batch)
    out = bg.evaluate(tr, images)
    ev = replay.group("eval")
    _, raw = one(rec.take("image"))
    if rec.seen.get("groups"):
        present, order = grouping(rec)
    else:                      # TEST_GROUP_BY_DOMAIN False: one group in the loader's order
        present, order = torch.empty(0, dtype=torch.long), torch.arange(len(label))
    add(ev, f"eval_logits_{when}", out.logits[order], case[f"eval_logits_{when}"])
    add(ev, f"eval_energy_{when}", energy_score(out.logits)[order], case[f"eval_energy_{when}"])
    add(replay.group("score"), f"eval_energy_{when}", out.score[order], case[f"eval_energy_{when}"])
    add(ev, "eval_row_order", order, case["eval_row_order"])
    add(ev, "eval_group_domains", present, case["eval_group_domains"])
    add(ev, "eval_label_new", label[order], case["eval_label_new"])
    add(ev, "enc_img_feat_eval", raw[order], case["enc_img_feat_eval"])
    rec.seen.clear()       # the evaluation's text features are not stored


def run_replay(case: bg.Case, dtype: torch.dtype, directory: str, extra_opts: tuple = (),
               mask_source: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Replay:
    """Replay ``case`` in ``dtype`` through the DPLCLIP trainer (``extra_opts``: config overrides; ``mask_source``:
    the dropout's keep-masks, default the recorded ones in order) and collect every error."""
    replay = Replay(case, dtype)
    with bg.default_dtype(dtype):
        tr = bg.build_case_trainer(case, directory, dtype, extra_opts)
        static_checks(tr, case, replay.group("static"))
        replay.init = {n: p.detach().clone() for n, p in tr.mlp.named_parameters()}
        params = bg.load_init(tr, case)
        draws = bg.DrawReplay([m.numpy() for m in bg.dropout_masks(case)])
        tr.mlp.dropout.mask_source = draws if mask_source is None else mask_source
        with bg.Recorder() as rec:
            instrument(rec, tr)
            compare_eval(tr, case, dtype, rec, replay, "init")
            bg.start_schedule(tr, case)
            for k in range(case.n_steps):
                record_step(tr, case, k, dtype, rec, params, replay)
            for lr in (g["lr"] for g in bg.optimiser_settings(tr)):
                replay.group("steps").add("lr_after", lr, case["lr_after"])
            compare_eval(tr, case, dtype, rec, replay, "final")
        if mask_source is None:
            replay.group("draws").add_flag("dropout_keep_flat (every mask used once)", draws.exhausted())
    return replay


@pytest.fixture(scope="module")
def replays(tmp_path_factory) -> bg.Replays:
    return bg.Replays(tmp_path_factory, FIXTURE, run_replay)


# ------------------------------------------------------------------------------------------------ parity
def test_the_fixture_has_dplclip_cases():
    assert CASES, f"{FIXTURE.path} has no {METHOD} case"


def test_named_fixes_are_protocol_switches():
    """The official values are the defaults and the record's ``protocol`` block lists the keys off them."""
    from dassl.config import get_cfg_default
    from dassl.engine.protocol import SWITCHES, protocol_block
    from trainers.dplclip import DPLCLIP

    official = {"LOGITS": "concat", "DOMAIN_POOL": "mean_of_mlp", "TEST_GROUP_BY_DOMAIN": True}
    cfg = get_cfg_default()
    DPLCLIP.extend_cfg(cfg)
    for key, value in official.items():
        assert SWITCHES[f"TRAINER.DPLCLIP.{key}"] == value == cfg.TRAINER.DPLCLIP[key], key
    fixed = {"LOGITS": "per_group", "DOMAIN_POOL": "mlp_of_mean", "TEST_GROUP_BY_DOMAIN": False}
    block = protocol_block({"TRAINER": {"DPLCLIP": fixed}})
    assert {f"TRAINER.DPLCLIP.{k}" for k in fixed} <= set(block["fixed"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", CASES)
def test_prompts_mlp_and_settings(key, dtype, replays):
    """Prompt tokens, MLP width/depth/dropout, the registered module ``DPL``, optimiser, images."""
    replays.get(key, dtype).group("static").check(bg.TOL64)


@pytest.mark.parametrize("key", CASES)
def test_mlp_initialisation(key, replays):
    """Biases 0.01 (equal to the fixture's ``init__`` biases, the official draws) and Xavier-uniform weights:
    |w| <= sqrt(6 / (fan_in + fan_out)) and a std of that bound / sqrt(3) within 20 % (the sample std of n uniform
    draws has a relative error of about sqrt(0.2 / n): 3 % for the 256 entries of a 16 x 16 layer)."""
    init = replays.get(key).init
    case = FIXTURE.case(key)
    module = one(case.strings("registered_models"))
    for name, value in init.items():
        if name.endswith(".bias"):
            assert torch.equal(value, case.tensor(f"init__{module}.{name}")), name
            continue
        bound = math.sqrt(6.0 / sum(value.shape))  # literal-ok: Xavier-uniform's bound
        assert float(value.abs().max()) <= bound, name
        assert abs(float(value.std()) / (bound / math.sqrt(3.0)) - 1.0) < 0.2, name  # literal-ok: 20 %, see above


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", CASES)
def test_training_steps(key, dtype, replays):
    """Per step: grouping and reordered labels, concatenated logits, energy, loss, accuracy, gradients, parameters."""
    r = replays.get(key, dtype)
    r.group("steps").check(bg.tolerance(METHOD, r.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", CASES)
def test_evaluation_groups_the_test_batch_by_domain(key, dtype, replays):
    """Evaluation logits (N x G·C, contexts from the evaluation batch's own domain groups) and energies."""
    r = replays.get(key, dtype)
    r.group("eval").check(bg.tolerance(METHOD, r.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", CASES)
def test_inference_output_score_is_the_energy(key, dtype, replays):
    """``InferenceOutput``'s default score is the energy, in the logits' dtype when that is float64
    (``dassl/engine/inference.py``), so it is held to the run's tolerance (float64: 1e-10)."""
    r = replays.get(key, dtype)
    r.group("score").check(bg.tolerance(METHOD, r.dtype))


@pytest.mark.parametrize("key", CASES)
def test_every_dropout_mask_is_used_once(key, replays):
    replays.get(key).group("draws").check(0.0)


@pytest.mark.parametrize("key", CASES)
def test_every_recorded_array_is_compared(key, replays):
    stored = {n[len(key) + 2:] for n in FIXTURE.arrays if n.startswith(f"{key}__")}
    compared = replays.get(key).compared
    unread = {n for n in stored - compared if n not in INPUT_ARRAYS and not n.startswith(INPUT_PREFIXES)
              and not n.startswith(("grad_", "param_", "has_grad__"))}
    assert not unread, f"{key}: arrays nobody compares: {sorted(unread)}"


# ------------------------------------------------------------------------------------------------ other files
@pytest.mark.parametrize("index", range(len(CASES)))
def test_parity_on_a_renamed_fixture(index, tmp_path_factory):
    """A file with other case keys, CLIP keys, case order, class names and seeds (same maths) passes unchanged:
    cases come from ``meta__case_keys`` and ``method``, names and seeds from the file."""
    r = bg.renamed_replay(FIXTURE, METHOD, index, run_replay, str(tmp_path_factory.mktemp("renamed") / "run"))
    for group in ("static", "steps", "eval", "draws"):
        r.group(group).check(0.0 if group == "draws" else bg.TOL64)


def test_no_size_or_name_of_the_fixture_is_spelled_out():
    """This file holds no literal size, count, hyper-parameter or name of the fixture's cases (the scan of
    ``test_baseline_parity.py``, which also shows that it finds planted literals)."""
    found = bg.spelled_out([__file__], *bg.fixture_literals(FIXTURE))
    assert not found, f"literals that belong in the fixture file: {found}"


# ------------------------------------------------------------------------------------------------ mutations
def _several_eval_domains(key: str) -> bool:
    return len(np.unique(FIXTURE.case(key)["d_eval"])) > 1


KEEP_ALL = torch.ones_like      # a dropout that keeps every entry (scaled by 1 / (1 - p))
MUTATIONS: dict[str, tuple[tuple, Any, tuple[str, ...], list[str]]] = {
    # name -> (extra opts, dropout mask source (None: the recorded masks), compared groups or arrays, cases)
    "LOGITS per_group": (("TRAINER.DPLCLIP.LOGITS", "per_group"), None, ("steps",), CASES),
    # one MLP call on the group means: the recorded masks do not fit, so only the evaluation before training
    # (no dropout, the fixture's initial weights) is compared
    "DOMAIN_POOL mlp_of_mean": (("TRAINER.DPLCLIP.DOMAIN_POOL", "mlp_of_mean"), KEEP_ALL, ("eval_logits_init",),
                                CASES),
    # one evaluation domain is one group either way: visible only where the evaluation batch holds several
    "TEST_GROUP_BY_DOMAIN False": (("TRAINER.DPLCLIP.TEST_GROUP_BY_DOMAIN", "False"), None, ("eval",),
                                   [k for k in CASES if _several_eval_domains(k)]),
    "no dropout": ((), KEEP_ALL, ("steps",), CASES),
    "weight decay 5e-4": (("OPTIM.WEIGHT_DECAY", "5e-4"), None, ("steps",), CASES),
}
MUTATION_CASES = [(m, k) for m, (_, _, _, keys) in MUTATIONS.items() for k in keys]


def worst(r: Replay, names: tuple[str, ...]) -> float:
    """The largest error of the named groups, or of the named arrays in any group."""
    if all(n in r.groups for n in names):
        return r.worst(*names)
    return max(g.values[n] for g in r.groups.values() for n in names if n in g.values)


@pytest.mark.parametrize("mutation,key", MUTATION_CASES)
def test_mutation_is_detected(mutation, key, tmp_path):
    """Each named fix (and each official detail named here) moves the float64 replay beyond the float32 tolerance."""
    extra, mask_source, names, _ = MUTATIONS[mutation]
    r = run_replay(FIXTURE.case(key), torch.float64, str(tmp_path), extra, mask_source)
    assert worst(r, names) > bg.TOL32, {g: e.values for g, e in r.groups.items()}
