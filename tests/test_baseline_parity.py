"""Golden parity of CoOp, CoCoOp, CLIP-Adapter and Tip-Adapter-F with numbers from the official code.

Every case of ``$BASELINES_FIXTURE`` (``fixtures/baselines_reference.npz``; ``fixtures/BASELINES.md``) whose
``method`` is one of these trainers is replayed through the project's real trainer (:mod:`baseline_golden`):
the tiny CLIP and the images of the case, ``build_trainer``, ``init__*`` loaded by name, one ``update_lr`` before
step 0, every step through ``forward_backward``, evaluation through ``model_inference`` before and after the
steps. Compared (norm-wise ``max|a-b|/max|ref|``, BASELINES.md tolerances: 1e-10 in float64, 5e-5 in float32):
image encoder outputs, prompt tokens, text features, per step logits, energy, loss, accuracy, raw gradients
(without weight decay) and parameters after the step, learning rates; evaluation logits and energies; Tip-Adapter-F
also its text classifier, its cache built by the trainer from the recorded shuffled passes, the affinities,
zero-shot and cache logits and the α/β sweep. ``test_every_recorded_array_is_compared`` checks that no output
array of a case goes unread. The mutation tests show that the comparison sees each official quirk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
import torch.nn as nn

import baseline_golden as bg
from baseline_golden import one, one_thread  # noqa: F401  (one_thread: autouse fixture)

# the harness steps the schedulers before any optimiser step (BASELINES.md section 3), which torch warns about
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
METHODS = ("CoOp", "CoCoOp", "CLIP_Adapter", "TIP_ADAPTER")
FIXTURE = bg.load_fixture()
CASES = [c.key for c in FIXTURE.cases(METHODS)]
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# arrays that are inputs of the harness (read, not produced by the official code); everything else is compared
INPUT_ARRAYS = ("method", "dataset_name", "trainer_config", "clip_key", "seed", "classnames", "alldomain", "opts",
                "registered_models", "param_names", "X_train", "X_train_uint8", "y_train", "d_train", "X_eval_uint8",
                "y_eval", "d_eval", "pixel_mean", "pixel_std", "cache_X_uint8", "cache_perm", "cache_labels",
                "cache_domains", "ab_pairs", "X_eval", "backbone_name")
INPUT_PREFIXES = ("init__", "sample_idx__")


# ------------------------------------------------------------------------------------------------ per trainer
@dataclass
class Spec:
    """What to record for one trainer: ``instrument(rec, tr)`` installs hooks; ``step(rec)`` / ``evaluation(rec)``
    turn what they saw into arrays named like the fixture's (steps: one step's slice, ``step_logits`` included;
    evaluation: without the ``_init``/``_final`` suffix, which the runner adds when the fixture holds only that
    variant)."""

    instrument: Callable[[bg.Recorder, Any], None]
    step: Callable[[bg.Recorder], dict[str, torch.Tensor]]
    evaluation: Callable[[bg.Recorder], dict[str, torch.Tensor]]


def _prompt_instrument(rec: bg.Recorder, tr: Any) -> None:
    rec.method("image", tr, "image_features")
    rec.method("logits", tr, "forward_logits")
    rec.module("text", tr.text_encoder)
    if hasattr(tr.prompt_learner, "meta_net"):
        rec.module("meta", tr.prompt_learner.meta_net)


def _prompt_arrays(rec: bg.Recorder, when: str) -> dict[str, torch.Tensor]:
    feats, raw = one(rec.take("image"))
    text = torch.cat(rec.take("text"))
    meta = rec.take("meta")
    logits = torch.cat(rec.take("logits"))
    prefix = "step_" if when == "step" else "eval_"
    out = {"enc_img_feat_" + ("train" if when == "step" else "eval"): raw,
           prefix + "text_feat_raw": text.reshape(len(raw), -1, text.shape[-1]) if meta else text}
    if when == "step":
        out.update(step_img_feat=feats, step_logits=logits)
    if meta:
        out[prefix + "meta_bias"] = torch.cat(meta)
    return out


def _head_instrument(rec: bg.Recorder, tr: Any) -> None:
    rec.method("raw", tr, "encode_images")
    rec.method("features", tr, "forward_features")
    rec.module("adapter", tr.adapter)
    if hasattr(tr, "logit_parts"):
        rec.method("parts", tr, "logit_parts")


def _head_arrays(rec: bg.Recorder, when: str) -> dict[str, torch.Tensor]:
    logits, x = one(rec.take("features"))
    module_out = one(rec.take("adapter"))
    parts = rec.take("parts")
    out = {"enc_img_feat_" + ("train" if when == "step" else "eval"): one(rec.take("raw"))}
    if when == "step":
        out.update(step_img_feat=x, step_logits=logits)
        out["step_affinity" if parts else "step_adapter_out"] = module_out
    elif parts:
        out["eval_img_feat"] = x
    if parts and when == "step":
        _, clip, cache = one(parts)
        out.update(step_clip_logits=clip, step_cache_logits=cache)
    return out


SPECS = {
    "CoOp": Spec(_prompt_instrument, lambda r: _prompt_arrays(r, "step"), lambda r: _prompt_arrays(r, "eval")),
    "CoCoOp": Spec(_prompt_instrument, lambda r: _prompt_arrays(r, "step"), lambda r: _prompt_arrays(r, "eval")),
    "CLIP_Adapter": Spec(_head_instrument, lambda r: _head_arrays(r, "step"), lambda r: _head_arrays(r, "eval")),
    "TIP_ADAPTER": Spec(_head_instrument, lambda r: _head_arrays(r, "step"), lambda r: _head_arrays(r, "eval")),
}


# ------------------------------------------------------------------------------------------------ static checks
def prompt_tokens(tr: Any, case: bg.Case) -> torch.Tensor:
    """The token ids the trainer feeds its text encoder, shaped like the case's ``tokenized_prompts``."""
    from clip_backbone import tokenize
    from trainers.clip_common import class_prompts
    from trainers.prompt_templates import IMAGENET_TEMPLATES_SELECT

    if case.method == "TIP_ADAPTER":
        per_template = [tokenize(class_prompts(case.classnames, t), tr.clip_bundle.context_length)
                        for t in IMAGENET_TEMPLATES_SELECT]
        return torch.stack(per_template, dim=1)
    if case.method == "CLIP_Adapter":
        return tokenize(class_prompts(case.classnames, tr.template), tr.clip_bundle.context_length)
    return tr.prompt_learner.tokenized_prompts


def text_checks(tr: Any, case: bg.Case, errors: bg.Errors) -> None:
    """The frozen text features a trainer computes once (CLIP-Adapter's single-template classifier)."""
    if case.has("text_feat_raw"):
        errors.add("text_feat_raw", tr.raw_text_features(), case["text_feat_raw"])


def static_checks(tr: Any, case: bg.Case, errors: bg.Errors) -> None:
    """Settings and fixed pieces the trainer built (exact): tokens, templates, n_ctx, ratio, α/β, passes,
    optimiser; the image normalisation recipe of BASELINES.md section 2."""
    from trainers.prompt_templates import IMAGENET_TEMPLATES_SELECT

    errors.add("tokenized_prompts", prompt_tokens(tr, case), case["tokenized_prompts"])
    bg.check_inputs(errors, case)
    settings = {"n_ctx": lambda: tr.prompt_learner.n_ctx, "ratio": lambda: tr.ratio, "alpha": lambda: tr.alpha,
                "beta": lambda: tr.beta, "aug_epochs": lambda: tr.cfg.TRAINER.TIP_ADAPTER.AUGMENT_EPOCH,
                "templates": lambda: float(list(IMAGENET_TEMPLATES_SELECT) != case.strings("templates")),
                "base_lr": lambda: tr.cfg.OPTIM.LR, "max_epoch": lambda: tr.cfg.OPTIM.MAX_EPOCH}
    for name, ours in settings.items():
        if case.has(name):
            errors.add(name, ours(), 0.0 if name == "templates" else case[name])
    bg.check_optimiser(errors, tr, case)


# ------------------------------------------------------------------------------------------------ one replay
Replay = bg.Replay


def tip_prepare(tr: Any, case: bg.Case, dtype: torch.dtype, replay: Replay, order_matched: bool = False) -> None:
    """Build the cache through the trainer from the recorded shuffled passes; compare it and the classifier."""
    batch = int(case["X_train"].shape[1])
    tr.train_loader_x = bg.PassLoader(bg.cache_passes(case, dtype, order_matched), batch)
    tr.prepare_cache()
    assert tr.train_loader_x.epoch == int(case["aug_epochs"]), "the cache did not read every recorded pass"
    cache = replay.group("cache")
    cache.add("cache_keys", tr.adapter.weight.detach().t(), case["cache_keys"])
    cache.add("cache_values", tr.adapter.cache_values, case["cache_values"])
    cache.add("clip_weights", tr.clip_weights.t(), case["clip_weights"])


def compare_eval(tr: Any, case: bg.Case, dtype: torch.dtype, spec: Spec, rec: bg.Recorder, replay: Replay,
                 when: str) -> None:
    from dassl.evaluation.scores import energy_score

    out = bg.evaluate(tr, case.tensor("X_eval", dtype))
    ev, score = replay.group("eval"), replay.group("score")
    ev.add(f"eval_logits_{when}", out.logits, case[f"eval_logits_{when}"])
    ev.add(f"eval_energy_{when}", energy_score(out.logits), case[f"eval_energy_{when}"])
    score.add(f"eval_energy_{when}", out.score, case[f"eval_energy_{when}"])
    for name, value in spec.evaluation(rec).items():
        for stored in (name, f"{name}_{when}"):
            if case.has(stored):
                ev.add(stored, value, case[stored])
    if case.has("ab_pairs"):
        alpha, beta = tr.alpha, tr.beta
        for i, (a, b) in enumerate(case["ab_pairs"]):
            tr.alpha, tr.beta = float(a), float(b)
            out = bg.evaluate(tr, case.tensor("X_eval", dtype))
            ev.add(f"eval_logits_ab_{when}", out.logits, case[f"eval_logits_ab_{when}"][i])
            ev.add(f"eval_energy_ab_{when}", energy_score(out.logits), case[f"eval_energy_ab_{when}"][i])
        tr.alpha, tr.beta = alpha, beta
        rec.seen.clear()  # the sweep's intermediates are not stored in the fixture


def compare_step(tr: Any, case: bg.Case, k: int, dtype: torch.dtype, spec: Spec, rec: bg.Recorder,
                 params: dict[str, nn.Parameter], replay: Replay) -> None:
    from dassl.evaluation.scores import energy_score

    r = bg.train_step(tr, case, k, dtype, params)
    steps = replay.group("steps")
    for lr in r["lrs"]:
        steps.add("lr_used", lr, case["lr_used"][k])
    steps.add("step_loss", r["summary"]["loss"], case["step_loss"][k])
    steps.add("step_acc", r["summary"]["acc"], case["step_acc"][k])
    arrays = spec.step(rec)
    arrays["step_energy"] = energy_score(arrays["step_logits"])
    for name, value in arrays.items():
        steps.add(name, value, case[name][k])
    for name in params:
        steps.add_flag(f"has_grad__{name}", (r["grad"][name] is not None) == bool(case[f"has_grad__{name}"][k]))
        if r["grad"][name] is not None:
            steps.add_snapshot(case, name, "grad", k, r["grad"][name])
        steps.add_snapshot(case, name, "param", k, r["param"][name])


def run_replay(case: bg.Case, dtype: torch.dtype, directory: str, extra_opts: tuple = (),
               mutate: Optional[Callable[[Any], None]] = None, order_matched: bool = False,
               schedule: bool = True) -> Replay:
    """Replay ``case`` in ``dtype`` through its trainer (optionally mutated) and collect every error."""
    replay = Replay(case, dtype)
    spec = SPECS[case.method]
    with bg.default_dtype(dtype):
        tr = bg.build_case_trainer(case, directory, dtype, extra_opts)
        if mutate is not None:
            mutate(tr)
        static_checks(tr, case, replay.group("static"))
        text_checks(tr, case, replay.group("text"))
        if case.method == "TIP_ADAPTER":
            tip_prepare(tr, case, dtype, replay, order_matched)
        params = bg.load_init(tr, case)
        with bg.Recorder() as rec:
            spec.instrument(rec, tr)
            compare_eval(tr, case, dtype, spec, rec, replay, "init")
            if schedule:
                bg.start_schedule(tr, case)
            else:
                tr.epoch, tr.num_batches = 1, case.n_steps
            for k in range(case.n_steps):
                compare_step(tr, case, k, dtype, spec, rec, params, replay)
            for lr in (g["lr"] for g in bg.optimiser_settings(tr)):
                replay.group("steps").add("lr_after", lr, case["lr_after"])
            compare_eval(tr, case, dtype, spec, rec, replay, "final")
    return replay


def group_tolerance(group: str, method: str, dtype: torch.dtype) -> float:
    """``static`` is exact; the rest (``score`` included, see ``test_inference_output_score_is_the_energy``)
    BASELINES.md's tolerance for the method and dtype."""
    return {"static": bg.TOL64}.get(group, bg.tolerance(method, dtype))


def check_replay(r: Replay) -> None:
    """Every group of a replay within its tolerance."""
    for name, group in r.groups.items():
        if group.values:
            group.check(group_tolerance(name, r.case.method, r.dtype))


@pytest.fixture(scope="module")
def replays(tmp_path_factory) -> bg.Replays:
    return bg.Replays(tmp_path_factory, FIXTURE, run_replay)


# ------------------------------------------------------------------------------------------------ parity
def test_the_fixture_has_cases_of_every_method():
    assert {FIXTURE.case(k).method for k in CASES} == set(METHODS), CASES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", CASES)
def test_encoders_prompts_and_settings(key, dtype, replays):
    """Prompt tokens, templates, settings and optimiser (exact), frozen text features (dtype tolerance)."""
    r = replays.get(key, dtype)
    r.groups["static"].check(bg.TOL64)
    if "text" in r.groups and r.groups["text"].values:
        r.groups["text"].check(bg.tolerance(r.case.method, r.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", CASES)
def test_training_steps(key, dtype, replays):
    """Per step: logits, energy, loss, accuracy, learning rate, raw gradients, parameters, intermediates."""
    r = replays.get(key, dtype)
    r.groups["steps"].check(bg.tolerance(r.case.method, r.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", CASES)
def test_evaluation(key, dtype, replays):
    """Evaluation logits and energies before and after training (Tip-Adapter-F: also the α/β sweep)."""
    r = replays.get(key, dtype)
    r.groups["eval"].check(bg.tolerance(r.case.method, r.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", CASES)
def test_inference_output_score_is_the_energy(key, dtype, replays):
    """``InferenceOutput``'s default score is the energy, in the logits' dtype when that is float64
    (``dassl/engine/inference.py``), so it is held to the run's tolerance (float64: 1e-10)."""
    r = replays.get(key, dtype)
    r.groups["score"].check(bg.tolerance(r.case.method, r.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", [k for k in CASES if FIXTURE.case(k).method == "TIP_ADAPTER"])
def test_tip_cache_and_classifier(key, dtype, replays):
    """``CACHE_MODE official`` builds the fixture's keys from the shuffled passes (rows average different images),
    values from pass 0, and the 7-template classifier."""
    r = replays.get(key, dtype)
    r.groups["cache"].check(bg.tolerance(r.case.method, r.dtype))


@pytest.mark.parametrize("key", CASES)
def test_every_recorded_array_is_compared(key, replays):
    case = FIXTURE.case(key)
    stored = {n[len(key) + 2:] for n in FIXTURE.arrays if n.startswith(f"{key}__")}
    unread = {n for n in stored - replays.get(key).compared
              if n not in INPUT_ARRAYS and not n.startswith(INPUT_PREFIXES)}
    assert not unread, f"{case}: arrays nobody compares: {sorted(unread)}"


# ------------------------------------------------------------------------------------------------ mutations
def _no_final_relu(tr: Any) -> None:
    tr.adapter.fc[len(tr.adapter.fc) - 1] = nn.Identity()


def _meta_net_on_raw_features(tr: Any) -> None:
    """The meta-net reads the raw image feature ``f = |f| * n(f)`` instead of ``n(f)``."""
    norms: dict[str, torch.Tensor] = {}
    original = tr.image_features

    def image_features(images: torch.Tensor, batch: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        feats, raw = original(images, batch)
        norms["n"] = raw.norm(dim=-1, keepdim=True)
        return feats, raw

    tr.image_features = image_features
    tr.prompt_learner.meta_net.register_forward_pre_hook(lambda m, args: (args[0] * norms["n"].to(args[0].dtype),))


MUTATIONS = {
    # name -> (methods, run_replay keyword arguments, compared groups)
    "weight_decay_5e-4": (METHODS, {"extra_opts": ("OPTIM.WEIGHT_DECAY", "5e-4")}, ("steps", "eval")),
    "no_warmup_step": (METHODS, {"schedule": False}, ("steps", "eval")),
    "clip_adapter_without_final_relu": (("CLIP_Adapter",), {"mutate": _no_final_relu}, ("steps", "eval")),
    "cocoop_meta_net_on_raw_features": (("CoCoOp",), {"mutate": _meta_net_on_raw_features}, ("steps", "eval")),
    "tip_order_matched_cache": (("TIP_ADAPTER",), {"order_matched": True}, ("cache",)),
}
MUTATION_CASES = [(m, k) for m, (methods, _, _) in MUTATIONS.items() for k in CASES
                  if FIXTURE.case(k).method in methods]


def test_every_mutation_has_a_case():
    assert {m for m, _ in MUTATION_CASES} == set(MUTATIONS)


@pytest.mark.parametrize("mutation,key", MUTATION_CASES)
def test_mutation_is_detected(mutation, key, tmp_path):
    """Each official quirk is visible: changing it moves the replay beyond the float32 tolerance."""
    _, kwargs, groups = MUTATIONS[mutation]
    r = run_replay(FIXTURE.case(key), torch.float64, str(tmp_path), **kwargs)
    assert r.worst(*groups) > bg.TOL32, {g: r.groups[g].values for g in groups}


# ------------------------------------------------------------------------------------------------ other files
@pytest.fixture(scope="module")
def renamed(tmp_path_factory) -> bg.Fixture:
    path = bg.renamed_copy(FIXTURE, str(tmp_path_factory.mktemp("renamed") / "renamed.npz"))
    return bg.Fixture(path)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_parity_on_a_renamed_fixture(index, renamed, tmp_path):
    """A file with other case keys, CLIP keys, case order, class names and seeds (same maths) passes unchanged:
    cases come from ``meta__case_keys`` and dispatch on ``method``, names and seeds are read from the file."""
    cases = renamed.cases(METHODS)
    assert [c.key for c in cases] == [f"re_{k}" for k in reversed(CASES)]
    case = cases[index]
    assert case.classnames == [c.upper() for c in FIXTURE.case(case.key[len("re_"):]).classnames]
    check_replay(run_replay(case, torch.float64, str(tmp_path)))


def test_no_size_or_name_of_the_fixture_is_spelled_out():
    """The helper and this file hold no literal size, count, hyper-parameter or name of the fixture's cases."""
    found = bg.spelled_out([bg.__file__, __file__], *bg.fixture_literals(FIXTURE))
    assert not found, f"literals that belong in the fixture file: {found}"


def test_the_literal_scan_finds_planted_literals(tmp_path):
    numbers, names = bg.fixture_literals(FIXTURE)
    case = FIXTURE.case(CASES[0])
    n_ctx, width = case["init__" + case.param_names[0]].shape[-2:]
    planted = tmp_path / "planted.py"
    planted.write_text(f"A = {int(width)}\nB = {case.classnames[0]!r}\nC = '{case.key}__X_train'\n"
                       f"D = {float(case['base_lr'])!r}  # a setting\nE = 2\n")
    lines = [line for _, line, _ in bg.spelled_out([str(planted)], numbers, names)]
    assert lines == [1, 2, 3, 4]  # literal-ok: line numbers of the planted file


@pytest.mark.parametrize("key", CASES)
def test_clip_package_builds_the_fixture_clip(key):
    """The OpenAI-compatible ``clip.build_model`` reads the fixture's state dict (architecture off the shapes) and
    its image encoder gives the case's features (in float32: its LayerNorms compute in float32, as OpenAI's)."""
    from clip.clip import build_model

    case = FIXTURE.case(key)
    model = build_model(bg.clip_state_dict(FIXTURE, case.clip_key)).float()
    with torch.no_grad():
        feats = model.encode_image(case.tensor("X_eval", torch.float32))
    assert bg.rel_err(feats, case["enc_img_feat_eval"]) <= bg.TOL32
