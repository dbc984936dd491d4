"""Golden parity of the baseline trainers: replay a case of ``fixtures/baselines_reference.npz`` through the
project's real trainer and compare with the numbers recorded from the official code (``fixtures/BASELINES.md``).

The file is ``$BASELINES_FIXTURE`` (default ``tests/fixtures/baselines_reference.npz``). Every size, class name,
domain, seed, hyper-parameter and sampled index comes from it; nothing here knows a particular case. One case:

1. :func:`clip_state_dict` rebuilds the tiny CLIP of ``<case>__clip_key`` (OpenAI layout, float64);
   :func:`fixture_backbone` writes it as a weights file plus an open_clip model config read off its shapes and lets
   ``clip_backbone`` see that config under a backbone name while the trainer is built.
2. :func:`write_dataset` writes a leave-one-domain-out tree (the case's images, class names, domains, held-out
   domain) under the case's dataset name; :func:`case_cfg` runs ``train.setup_cfg`` on the case's dataset and
   trainer yaml and its ``opts`` mapped to the project's keys (:data:`OPT_ALIASES`, :data:`ARRAY_OPTS`);
   :func:`build_case_trainer` builds the registered trainer with ``build_trainer`` (the real path).
3. :func:`cast_trainer` puts CLIP and the registered modules in the run's dtype (CLIP reloaded from the float64
   state dict, its logit scale derived again: what loading the CLIP at that precision gives);
   :func:`load_init` copies ``init__*`` into the trainable tensors by name (:func:`param_map`, loud on any
   unmapped tensor).
4. :func:`start_schedule` puts the schedulers where the official harness had them (BASELINES.md §3);
   :func:`train_step` runs the trainer's ``forward_backward``, :func:`evaluate` its ``model_inference``;
   :class:`Recorder` keeps what hooks and wrappers see (instrumentation only, no value changes).
5. :func:`rel_err` (norm-wise ``max|a-b| / max|ref|``), :func:`snapshot_pairs` (full or sampled snapshots),
   :class:`Errors` (collect per array over steps, then assert against :func:`tolerance`).
6. Replayed randomness: :func:`cache_passes` / :class:`PassLoader` (Tip-Adapter's shuffled cache passes),
   :class:`DrawReplay` (recorded noise draws), :func:`dropout_masks` / :func:`replay_dropout` (dropout masks).
"""
from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pytest
import torch
import torch.nn as nn

TESTS = os.path.dirname(os.path.abspath(__file__))
COOP = os.path.join(os.path.dirname(TESTS), "CoOp")
FIXTURE_ENV = "BASELINES_FIXTURE"
DEFAULT_FIXTURE = os.path.join(TESTS, "fixtures", "baselines_reference.npz")
OPENAI_HEAD_WIDTH = 64  # literal-ok: OpenAI's CLIP has width / 64 attention heads (BASELINES.md section 2)

# BASELINES.md section 1: float64 re-implementations reach 7.6e-14; the official float32 run differs from the
# float64 numbers by at most 2.4e-5 (5.6e-5 for Bayes-CAL), hence about 2x margin.
TOL64 = 1e-10
TOL32 = 5e-5
TOL32_BY_METHOD = {"BCAL": 1e-4}

# official top-level keys of the harness' opts -> the project's keys (other keys are the same in both)
OPT_ALIASES = {"alpha1": "TRAINER.BCAL.ALPHA1", "alpha2": "TRAINER.BCAL.ALPHA2", "alpha3": "TRAINER.BCAL.ALPHA3",
               "mlp_width": "TRAINER.DPLCLIP.MLP_WIDTH", "mlp_depth": "TRAINER.DPLCLIP.MLP_DEPTH",
               "mlp_dropout": "TRAINER.DPLCLIP.MLP_DROPOUT"}
# per-case arrays that hold settings the harness set outside opts (or official constants the project makes keys)
ARRAY_OPTS: dict[str, dict[str, tuple[str, ...]]] = {
    "CLIP_Adapter": {"ratio": ("TRAINER.CLIP_ADAPTER.RATIO",)},
    "TIP_ADAPTER": {"aug_epochs": ("TRAINER.TIP_ADAPTER.AUGMENT_EPOCH",), "alpha": ("TRAINER.TIP_ADAPTER.ALPHA",),
                    "beta": ("TRAINER.TIP_ADAPTER.BETA",)},
    "DPLCLIP": {"mlp_width": ("TRAINER.DPLCLIP.MLP_WIDTH",), "mlp_depth": ("TRAINER.DPLCLIP.MLP_DEPTH",),
                "mlp_dropout": ("TRAINER.DPLCLIP.MLP_DROPOUT",)},
    "BCAL": {"alphas": ("TRAINER.BCAL.ALPHA1", "TRAINER.BCAL.ALPHA2", "TRAINER.BCAL.ALPHA3"),
             "sigma_init": ("TRAINER.BCAL.SIGMA_INIT",)},
}


def fixture_path() -> str:
    """``$BASELINES_FIXTURE``, else the shared reference file."""
    return os.environ.get(FIXTURE_ENV) or DEFAULT_FIXTURE


def tolerance(method: str, dtype: torch.dtype) -> float:
    """BASELINES.md section 1: norm-wise 1e-10 in float64; 5e-5 in float32 (Bayes-CAL 1e-4)."""
    return TOL64 if dtype == torch.float64 else TOL32_BY_METHOD.get(method, TOL32)


# ----------------------------------------------------------------------------------------------- the file
class Fixture:
    """All arrays of one fixture file (``<group>__<name>``), loaded once."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{FIXTURE_ENV}: fixture file not found: {path}")
        self.path = path
        with np.load(path, allow_pickle=False) as z:
            self.arrays = {k: z[k] for k in z.files}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise KeyError(f"{self.path} has no array {name!r}")
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    @property
    def case_keys(self) -> list[str]:
        return [str(k) for k in self["meta__case_keys"]]

    def case(self, key: str) -> "Case":
        return Case(self, key)

    def cases(self, methods: Optional[Sequence[str]] = None) -> list["Case"]:
        """The cases in ``meta__case_keys`` order, optionally only those whose ``method`` is in ``methods``."""
        cases = [self.case(k) for k in self.case_keys]
        return [c for c in cases if methods is None or c.method in methods]


@functools.lru_cache(maxsize=None)
def load_fixture(path: Optional[str] = None) -> Fixture:
    return Fixture(path or fixture_path())


class Case:
    """One case (``<key>__*`` arrays) with typed accessors."""

    def __init__(self, fixture: Fixture, key: str) -> None:
        self.fixture, self.key = fixture, key

    def __repr__(self) -> str:
        return f"Case({self.key!r}, {self.method})"

    def __getitem__(self, name: str) -> np.ndarray:
        return self.fixture[f"{self.key}__{name}"]

    def has(self, name: str) -> bool:
        return f"{self.key}__{name}" in self.fixture

    def text(self, name: str) -> str:
        return str(self[name])

    def strings(self, name: str) -> list[str]:
        return [str(s) for s in np.atleast_1d(self[name])]

    def tensor(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = torch.from_numpy(np.array(self[name]))
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    @property
    def method(self) -> str:
        return self.text("method")

    @property
    def clip_key(self) -> str:
        return self.text("clip_key")

    @property
    def dataset(self) -> str:
        return self.text("dataset_name")

    @property
    def seed(self) -> int:
        return int(self["seed"])

    @property
    def classnames(self) -> list[str]:
        return self.strings("classnames")

    @property
    def alldomain(self) -> list[str]:
        return self.strings("alldomain")

    @property
    def param_names(self) -> list[str]:
        return self.strings("param_names")

    @property
    def n_steps(self) -> int:
        return int(self["X_train"].shape[0])

    def opts(self) -> list[tuple[str, str]]:
        flat = self.strings("opts")
        if len(flat) % 2:
            raise ValueError(f"{self.key}__opts has an odd number of items: {flat}")
        return list(zip(flat[0::2], flat[1::2]))

    def opt(self, key: str) -> str:
        values = [v for k, v in self.opts() if k == key]
        if not values:
            raise KeyError(f"{self.key}__opts has no {key}")
        return values[-1]

    def train_batch(self, k: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Training batch ``k`` as the loader would give it (images, labels, domains)."""
        return {"img": self.tensor("X_train", dtype)[k], "label": self.tensor("y_train")[k].long(),
                "domain": self.tensor("d_train")[k].long()}


def normalise_images(u8: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """BASELINES.md section 2: ``(u8 / 255 - mean) / std`` per channel, in float64 (layout ``... x 3 x H x W``)."""
    shape = (3, 1, 1)
    return (u8.astype(np.float64) / 255.0 - np.reshape(mean, shape)) / np.reshape(std, shape)


# ----------------------------------------------------------------------------------------------- the tiny CLIP
def clip_state_dict(fixture: Fixture, clip_key: str) -> dict[str, torch.Tensor]:
    """OpenAI-layout state dict (float64) of ``<clip_key>``; the token embedding's listed rows are scattered into
    a zero matrix of ``tokemb_shape`` (BASELINES.md section 2)."""
    prefix = f"{clip_key}__sd__"
    sd = {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in fixture.arrays.items() if k.startswith(prefix)}
    if not sd:
        raise KeyError(f"{fixture.path} has no {prefix}* arrays")
    shape = tuple(int(x) for x in fixture[f"{clip_key}__tokemb_shape"])
    emb = torch.zeros(shape, dtype=torch.float64)
    emb[torch.from_numpy(fixture[f"{clip_key}__tokemb_ids"]).long()] = torch.from_numpy(
        fixture[f"{clip_key}__tokemb_rows"])
    sd["token_embedding.weight"] = emb
    return sd


def open_clip_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The open_clip model config of an OpenAI-layout ViT state dict, read off its shapes as OpenAI's
    ``build_model`` does (heads = width / 64, QuickGELU)."""
    def layers(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    conv = sd["visual.conv1.weight"]
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    v_width, t_width = int(conv.shape[0]), int(sd["ln_final.weight"].shape[0])
    v_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / v_width
    t_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / t_width
    return {"embed_dim": int(sd["text_projection"].shape[1]), "quick_gelu": True,
            "vision_cfg": {"layers": layers("visual.transformer.resblocks."), "width": v_width,
                           "head_width": OPENAI_HEAD_WIDTH,
                           "patch_size": int(conv.shape[-1]), "image_size": int(conv.shape[-1]) * grid,
                           "mlp_ratio": v_mlp},
            "text_cfg": {"context_length": int(sd["positional_embedding"].shape[0]),
                         "vocab_size": int(sd["token_embedding.weight"].shape[0]), "width": t_width,
                         "heads": t_width // OPENAI_HEAD_WIDTH, "layers": layers("transformer.resblocks."),
                         "mlp_ratio": t_mlp}}


@contextlib.contextmanager
def fixture_backbone(fixture: Fixture, clip_key: str, directory: str) -> Iterator[tuple[str, str, dict]]:
    """Yield ``(MODEL.BACKBONE.NAME, MODEL.BACKBONE.WEIGHTS, float64 state dict)`` of the fixture's CLIP.

    The weights go to ``<directory>/<clip_key>.pt`` and the config to ``<directory>/model_configs``; while the
    block runs, ``clip_backbone`` reads its custom configs from that folder (restored afterwards)."""
    from clip_backbone import loader

    sd = clip_state_dict(fixture, clip_key)
    name = f"fixture-{clip_key}"
    cfg_dir = os.path.join(directory, "model_configs")
    os.makedirs(cfg_dir, exist_ok=True)
    with open(os.path.join(cfg_dir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(open_clip_config(sd), f)
    weights = os.path.join(directory, f"{clip_key}.pt")
    torch.save(sd, weights)
    old = loader.CONFIG_DIR
    loader.CONFIG_DIR = cfg_dir
    try:
        yield name, weights, sd
    finally:
        loader.CONFIG_DIR = old


# ----------------------------------------------------------------------------------------------- data and config
def held_out_domain(case: Case) -> str:
    """The held-out domain named by the case's ``TEST_ENV`` (``test_on_<domain>.json``)."""
    env = case.opt("TEST_ENV")
    env = env[:-len(".json")] if env.endswith(".json") else env
    return env[len("test_on_"):] if env.startswith("test_on_") else env


def write_dataset(case: Case, root: str) -> None:
    """``<root>/<dataset>/images/<domain>/c<label>/*.png`` from the case's uint8 images and
    ``test_on_<held-out>.json``: train = the training batches, test = the evaluation batch (class names from
    ``classnames``, domains from ``alldomain``)."""
    from PIL import Image

    base = os.path.join(root, case.dataset)
    names, domains = case.classnames, case.alldomain

    def write(images: np.ndarray, labels: np.ndarray, doms: np.ndarray, tag: str) -> list[list]:
        items = []
        for i, (img, lab, dom) in enumerate(zip(images, labels, doms)):
            rel = f"{domains[int(dom)]}/c{int(lab)}/{tag}_{i}.png"
            os.makedirs(os.path.dirname(os.path.join(base, "images", rel)), exist_ok=True)
            Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(os.path.join(base, "images", rel))
            items.append([rel, int(lab), names[int(lab)]])
        return items

    u8, y, d = case["X_train_uint8"], case["y_train"], case["d_train"]
    train = write(u8.reshape(-1, *u8.shape[2:]), y.reshape(-1), d.reshape(-1), "train")
    test = write(case["X_eval_uint8"], case["y_eval"], case["d_eval"], "eval")
    with open(os.path.join(base, f"test_on_{held_out_domain(case)}.json"), "w", encoding="utf-8") as f:
        json.dump({"train": train, "val": [], "test": test}, f)


def _fmt(value: Any) -> str:
    value = np.asarray(value).item()
    return str(int(value)) if isinstance(value, (int, np.integer)) else repr(float(value))


def project_opts(case: Case) -> list[str]:
    """The case's ``opts`` with official top-level keys renamed (:data:`OPT_ALIASES`), then the settings stored
    as arrays (:data:`ARRAY_OPTS`); a key the project lacks is a one-line ``setup_cfg`` error."""
    out = [x for k, v in case.opts() for x in (OPT_ALIASES.get(k, k), v)]
    for array, keys in ARRAY_OPTS.get(case.method, {}).items():
        if case.has(array):
            values = np.atleast_1d(case[array])
            if len(values) != len(keys):
                raise ValueError(f"{case.key}__{array} has {len(values)} values for {keys}")
            out += [x for key, val in zip(keys, values) for x in (key, _fmt(val))]
    return out


def case_cfg(case: Case, root: str, out: str, backbone: str, weights: str, extra: Sequence[str] = ()) -> Any:
    """The project's config of ``case`` through ``train.setup_cfg`` (as ``train.py`` builds it)."""
    import train

    args = ["--root", root, "--seed", str(case.seed), "--trainer", case.method,
            "--dataset-config-file", os.path.join(COOP, "configs", "datasets", f"{case.dataset}.yaml"),
            "--config-file", os.path.join(COOP, case.text("trainer_config")), "--output-dir", out,
            *project_opts(case), "MODEL.BACKBONE.NAME", backbone, "MODEL.BACKBONE.WEIGHTS", weights,
            "DATALOADER.NUM_WORKERS", "0", "DEVICE", "cpu", *extra]
    return train.setup_cfg(train.get_parser().parse_args(args))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype inside the block (the official harness ran with float64 as the default)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------------------------- the trainer
def build_case_trainer(case: Case, directory: str, dtype: torch.dtype = torch.float64,
                       extra_opts: Sequence[str] = ()) -> Any:
    """The case's trainer built by ``build_trainer`` (seeded like ``train.py``), cast to ``dtype``.

    ``directory`` receives the dataset tree, the CLIP files and the run's output folder."""
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed

    root = os.path.join(directory, "data")
    write_dataset(case, root)
    with fixture_backbone(case.fixture, case.clip_key, os.path.join(directory, "clip")) as (name, weights, sd):
        cfg = case_cfg(case, root, os.path.join(directory, "out"), name, weights, extra_opts)
        set_random_seed(cfg.SEED)
        with default_dtype(dtype):
            trainer = build_trainer(cfg)
    ds = trainer.dm.dataset
    if list(ds.classnames) != case.classnames:
        raise AssertionError(f"{case.key}: dataset class names {ds.classnames} != fixture {case.classnames}")
    if list(getattr(ds, "domain_list", case.alldomain)) != case.alldomain:
        raise AssertionError(f"{case.key}: dataset domains {ds.domain_list} != fixture {case.alldomain}")
    cast_trainer(trainer, dtype, sd)
    return trainer


def cast_trainer(trainer: Any, dtype: torch.dtype, sd: dict[str, torch.Tensor]) -> None:
    """CLIP and every registered module in ``dtype``; CLIP's weights reloaded from ``sd`` at that precision and
    ``logit_scale`` derived from them (what the loader gives for a CLIP loaded in ``dtype``)."""
    clip_model = trainer.clip_model
    clip_model.to(dtype)
    clip_model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    for name in trainer.get_model_names():
        trainer._models[name].to(dtype)
    trainer.logit_scale = float(clip_model.logit_scale.detach().exp())


def param_map(trainer: Any, case: Case, aliases: Optional[dict[str, str]] = None) -> dict[str, nn.Parameter]:
    """Official trainable tensor name (``<registered module>.<param>``) -> the project's parameter.

    ``aliases`` maps an official name to the project's ``<registered model>.<param path>`` (identity otherwise).
    Every official name must resolve, and every trainable parameter of the registered models must be named."""
    aliases = aliases or {}
    out = {}
    for official in case.param_names:
        ours = aliases.get(official, official)
        model, _, path = ours.partition(".")
        if model not in trainer.get_model_names():
            raise AssertionError(f"{case.key}: {official!r} -> {ours!r}: no registered model {model!r} "
                                 f"(registered: {trainer.get_model_names()})")
        try:
            out[official] = trainer._models[model].get_parameter(path)
        except AttributeError:
            raise AssertionError(f"{case.key}: {official!r} -> {ours!r}: {model} has no parameter {path!r}") from None
    mapped = {id(p) for p in out.values()}
    unmapped = [f"{m}.{n}" for m in trainer.get_model_names() for n, p in trainer._models[m].named_parameters()
                if p.requires_grad and id(p) not in mapped]
    if unmapped or len(mapped) != len(out):
        raise AssertionError(f"{case.key}: trainable tensors without an official counterpart: {unmapped} "
                             f"(or two official names on one tensor)")
    return out


def load_init(trainer: Any, case: Case, aliases: Optional[dict[str, str]] = None) -> dict[str, nn.Parameter]:
    """Copy ``init__<p>`` into the mapped parameters (shapes must agree); returns the map."""
    params = param_map(trainer, case, aliases)
    with torch.no_grad():
        for name, p in params.items():
            init = case.tensor(f"init__{name}")
            if tuple(init.shape) != tuple(p.shape):
                raise AssertionError(f"{case.key}: init__{name} has shape {tuple(init.shape)}, ours {tuple(p.shape)}")
            p.copy_(init.to(p.dtype))
    return params


# ----------------------------------------------------------------------------------------------- running
def optimiser_settings(trainer: Any) -> list[dict[str, Any]]:
    """``lr, weight_decay, momentum, dampening, nesterov`` of every registered optimiser's param groups."""
    keys = ("lr", "weight_decay", "momentum", "dampening", "nesterov")
    return [{k: g[k] for k in keys} for name in trainer.get_model_names() if trainer._optims[name] is not None
            for g in trainer._optims[name].param_groups]


def check_inputs(errors: Any, case: Case) -> None:
    """The image normalisation recipe (BASELINES.md section 2) and the source domains of a case's training images."""
    for split in ("train", "eval"):
        errors.add(f"X_{split}", normalise_images(case[f"X_{split}_uint8"], case["pixel_mean"], case["pixel_std"]),
                   case[f"X_{split}"])
    errors.add_flag("source_domains", sorted(set(case["d_train"].ravel().tolist()))
                    == sorted(case["source_domains"].tolist()))


def check_optimiser(errors: Any, trainer: Any, case: Case, lr_epoch1: bool = True) -> None:
    """Every parameter group's SGD settings (and, ``lr_epoch1``, its first-epoch learning rate) against the case."""
    for group in optimiser_settings(trainer):
        for name in ("weight_decay", "momentum", "dampening", "nesterov"):
            errors.add(name, float(group[name]), float(case[name]))
        if lr_epoch1:
            errors.add("lr_epoch1", group["lr"], case["lr_epoch1"])


@contextlib.contextmanager
def _one_thread_body() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Autouse fixture of the parity modules (import it): their replays run on one torch thread."""
    with _one_thread_body():
        yield


def one(outputs: list[Any]) -> Any:
    """The single recorded call of a hook."""
    assert len(outputs) == 1, f"expected one recorded call, got {len(outputs)}"
    return outputs[0]


def start_schedule(trainer: Any, case: Case) -> None:
    """BASELINES.md section 3: epoch 1 (warm-up), one ``update_lr`` before step 0, the steps one epoch."""
    trainer.epoch = 1
    trainer.update_lr()
    trainer.num_batches = case.n_steps


def train_step(trainer: Any, case: Case, k: int, dtype: torch.dtype,
               params: dict[str, nn.Parameter]) -> dict[str, Any]:
    """Step ``k`` through the trainer's ``forward_backward``: its summary, the learning rate used, and per
    official tensor name the raw gradient (or None) and the value after the step."""
    trainer.set_model_mode("train")
    trainer.batch_idx = k
    lrs = [g["lr"] for g in optimiser_settings(trainer)]
    summary = trainer.forward_backward(case.train_batch(k, dtype))
    return {"summary": summary, "lrs": lrs,
            "grad": {n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()},
            "param": {n: p.detach().clone() for n, p in params.items()}}


def evaluate(trainer: Any, images: Any) -> Any:
    """The trainer's ``model_inference`` in eval mode without gradients, read as an ``InferenceOutput``."""
    trainer.set_model_mode("eval")
    with torch.no_grad():
        return trainer.inference_output(images)


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    return x


class Recorder:
    """Instrumentation that changes no value (as the official harness, BASELINES.md section 9.9): forward hooks
    on modules and wrappers around bound methods keep every output (detached copies) under a name."""

    def __init__(self) -> None:
        self.seen: dict[str, list[Any]] = defaultdict(list)
        self._undo: list[Callable[[], None]] = []

    def module(self, name: str, module: nn.Module) -> None:
        handle = module.register_forward_hook(lambda m, args, out: self.seen[name].append(_detach(out)))
        self._undo.append(handle.remove)

    def method(self, name: str, obj: Any, attr: str) -> None:
        original = getattr(obj, attr)
        had_own = attr in vars(obj)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.seen[name].append(_detach(out))
            return out

        setattr(obj, attr, wrapper)
        self._undo.append(lambda: setattr(obj, attr, original) if had_own else delattr(obj, attr))

    def take(self, name: str) -> list[Any]:
        """The outputs recorded under ``name`` since the last ``take`` (then forgotten)."""
        return self.seen.pop(name, [])

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- comparing
def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_err(ours: Any, ref: Any) -> float:
    """Norm-wise relative error ``max|ours - ref| / max|ref|`` (BASELINES.md section 1; a scalar: relative error;
    an all-zero reference: the absolute error). Shapes must agree."""
    a, b = _np(ours), _np(ref)
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape} != reference shape {b.shape}")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return diff / scale if scale > 0 else diff


def snapshot_pairs(case: Case, name: str, kind: str, k: int, value: torch.Tensor) -> list[tuple[str, Any, Any]]:
    """``(fixture array, ours, reference)`` for ``value``, the ``kind`` (``grad`` or ``param``) of tensor ``name``
    at step ``k``: the full snapshot ``<kind>__<name>`` when stored, else the entries at the sampled flat indices
    (``sample_idx__`` -> ``<kind>_sample__``) and the Frobenius norm (``<kind>_l2__``)."""
    if case.has(f"{kind}__{name}"):
        return [(f"{kind}__{name}", value, case[f"{kind}__{name}"][k])]
    idx = torch.from_numpy(case[f"sample_idx__{name}"]).long()
    return [(f"{kind}_sample__{name}", value.reshape(-1)[idx], case[f"{kind}_sample__{name}"][k]),
            (f"{kind}_l2__{name}", value.double().norm(), case[f"{kind}_l2__{name}"][k])]


def snapshot_error(case: Case, name: str, kind: str, k: int, value: torch.Tensor) -> float:
    """Error of one step's snapshot alone (the largest of :func:`snapshot_pairs`' errors); :class:`Errors`
    ``add_snapshot`` judges the arrays over all steps instead."""
    return max(rel_err(ours, ref) for _, ours, ref in snapshot_pairs(case, name, kind, k, value))


class Errors:
    """Norm-wise errors per fixture array. An array compared in pieces (one step, one sweep entry at a time) is
    judged as a whole, as BASELINES.md section 1 measures it: ``max|a-b|`` over all pieces / ``max|ref|`` over
    all pieces. :meth:`check` asserts every array against one tolerance."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.diff: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.direct: dict[str, float] = {}

    def add(self, name: str, ours: Any, ref: Any) -> None:
        a, b = _np(ours), _np(ref)
        if a.shape != b.shape:
            raise AssertionError(f"{self.label}: {name}: shape {a.shape} != reference shape {b.shape}")
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        self.diff[name] = max(self.diff.get(name, 0.0), diff if np.isfinite(diff) else float("inf"))
        self.scale[name] = max(self.scale.get(name, 0.0), float(np.max(np.abs(b))) if b.size else 0.0)

    def add_snapshot(self, case: Case, name: str, kind: str, k: int, value: torch.Tensor) -> None:
        for array, ours, ref in snapshot_pairs(case, name, kind, k, value):
            self.add(array, ours, ref)

    def add_value(self, name: str, error: float) -> None:
        """An error computed elsewhere (the largest one given under ``name`` counts)."""
        self.direct[name] = max(self.direct.get(name, 0.0), float(error))

    def add_flag(self, name: str, ok: bool) -> None:
        """A yes/no check (e.g. a gradient exists when the official one did): error 0 or 1."""
        self.add(name, 0.0 if ok else 1.0, 0.0)

    @property
    def values(self) -> dict[str, float]:
        """Error per array: ``diff / scale`` (an all-zero reference: the absolute difference)."""
        out = {k: (d / self.scale[k] if self.scale[k] > 0 else d) for k, d in self.diff.items()}
        for k, e in self.direct.items():
            out[k] = max(out.get(k, 0.0), e)
        return out

    def worst(self) -> float:
        return max(self.values.values())

    def check(self, tol: float) -> None:
        values = self.values
        assert values, f"{self.label}: nothing was compared"
        bad = {k: v for k, v in sorted(values.items(), key=lambda kv: -kv[1]) if not v <= tol}
        assert not bad, f"{self.label}: {len(bad)} of {len(values)} arrays above {tol:g}: {bad}"


# ----------------------------------------------------------------------------------------------- replayed randomness
def cache_passes(case: Case, dtype: torch.dtype, order_matched: bool = False) -> list[dict[str, torch.Tensor]]:
    """Tip-Adapter's augmented cache passes (``cache_X_uint8``, normalised with the case's mean/std; labels,
    domains): one dict per pass, in the recorded shuffled order. ``order_matched``: every pass reordered like
    pass 0 (each row then averages views of one image: the original Tip-Adapter, not what the official code did)."""
    u8, labels, doms = case["cache_X_uint8"], case["cache_labels"], case["cache_domains"]
    imgs = normalise_images(u8, case["pixel_mean"], case["pixel_std"])
    perm = case["cache_perm"]
    out = []
    for e in range(len(u8)):
        order = np.arange(len(perm[e]))
        if order_matched:
            position = {int(img): r for r, img in enumerate(perm[e])}
            order = np.array([position[int(img)] for img in perm[0]])
        out.append({"img": torch.from_numpy(imgs[e][order]).to(dtype),
                    "label": torch.from_numpy(labels[e][order]).long(),
                    "domain": torch.from_numpy(doms[e][order]).long()})
    return out


class PassLoader:
    """A stand-in for the training loader (as the official harness used, BASELINES.md section 9.5): iteration e
    yields pass e of ``passes`` in batches of ``batch_size`` (each pass holds all cache images)."""

    def __init__(self, passes: list[dict[str, torch.Tensor]], batch_size: int) -> None:
        self.passes, self.batch_size, self.epoch = passes, batch_size, 0

    def __len__(self) -> int:
        return -(-len(self.passes[0]["img"]) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.epoch >= len(self.passes):
            raise AssertionError(f"cache pass {self.epoch + 1} asked for; the fixture recorded {len(self.passes)}")
        p = self.passes[self.epoch]
        self.epoch += 1
        for i in range(0, len(p["img"]), self.batch_size):
            yield {k: v[i:i + self.batch_size] for k, v in p.items()}


class DrawReplay:
    """Recorded random draws handed out in order, e.g. as a ``noise_source(like)`` or in place of
    ``torch.randn_like``: each call returns the next draw in ``like``'s dtype/device (shapes must agree)."""

    def __init__(self, draws: Sequence[Any]) -> None:
        self.draws = [torch.as_tensor(np.asarray(d)) for d in draws]
        self.used = 0

    def __call__(self, like: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.used >= len(self.draws):
            raise AssertionError(f"draw {self.used + 1} asked for; {len(self.draws)} were recorded")
        d = self.draws[self.used]
        if tuple(d.shape) != tuple(like.shape):
            raise AssertionError(f"draw {self.used + 1}: recorded shape {tuple(d.shape)}, asked {tuple(like.shape)}")
        self.used += 1
        return d.to(device=like.device, dtype=like.dtype)

    def exhausted(self) -> bool:
        return self.used == len(self.draws)


def dropout_masks(case: Case) -> list[torch.Tensor]:
    """The keep-masks of every dropout call in time order (``dropout_keep_flat`` split by ``dropout_call_rows``)."""
    flat = torch.from_numpy(case["dropout_keep_flat"])
    rows = [int(r) for r in case["dropout_call_rows"]]
    if sum(rows) != flat.shape[0]:
        raise AssertionError(f"{case.key}: dropout_call_rows sum to {sum(rows)}, dropout_keep_flat has "
                             f"{flat.shape[0]} rows")
    return list(torch.split(flat, rows))


@contextlib.contextmanager
def replay_dropout(module: nn.Module, masks: Sequence[torch.Tensor]) -> Iterator[DrawReplay]:
    """Every ``nn.Dropout`` in ``module`` that runs in training mode uses the next recorded keep-mask
    (kept entries scaled by 1/(1-p), dropped ones 0) instead of a fresh draw; yields the replay (check
    ``exhausted()``)."""
    replay = DrawReplay([m.numpy() for m in masks])
    handles = []

    def hook(m: nn.Dropout, args: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
        if not m.training or m.p == 0:
            return None
        keep = replay(out).to(torch.bool)
        return args[0] * keep.to(args[0].dtype) / (1.0 - m.p)

    for m in module.modules():
        if isinstance(m, nn.Dropout):
            handles.append(m.register_forward_hook(hook))
    try:
        yield replay
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------- other files
def renamed_copy(fixture: Fixture, path: str) -> str:
    """Write a copy of ``fixture`` whose maths is unchanged but whose names and order are not, to show that a test
    reads them from the file: case keys ``<key>`` -> ``re_<key>``, CLIP keys ``<clip>`` -> ``re_<clip>``,
    ``meta__case_keys`` reversed, class names upper-cased (CLIP's tokenizer lower-cases, so the token ids, and
    every number, stay the same) and seeds rotated among the cases (a seed only drives initialisations that
    ``init__*`` replaces). Returns ``path``."""
    keys = fixture.case_keys
    clips = sorted({str(fixture[f"{k}__clip_key"]) for k in keys})
    seeds = [fixture[f"{k}__seed"] for k in keys]
    out: dict[str, np.ndarray] = {}
    for name, value in fixture.arrays.items():
        group, _, rest = name.partition("__")
        group = f"re_{group}" if group in keys or group in clips else group
        out[f"{group}__{rest}"] = value
    for i, k in enumerate(keys):
        out[f"re_{k}__clip_key"] = np.array(f"re_{fixture[f'{k}__clip_key']}")
        out[f"re_{k}__classnames"] = np.array([str(c).upper() for c in fixture[f"{k}__classnames"]])
        out[f"re_{k}__seed"] = seeds[(i + 1) % len(seeds)]
    out["meta__case_keys"] = np.array([f"re_{k}" for k in reversed(keys)])
    np.savez_compressed(path, **out)
    return path


@dataclass
class Replay:
    """Errors of one replay by group (e.g. ``static``, ``steps``, ``eval``, ``draws``) and the names compared."""

    case: Case
    dtype: torch.dtype
    groups: dict[str, Errors] = field(default_factory=dict)
    init: dict[str, torch.Tensor] = field(default_factory=dict)

    def group(self, name: str) -> Errors:
        return self.groups.setdefault(name, Errors(f"{self.case.key} {self.dtype} {name}"))

    @property
    def compared(self) -> set[str]:
        """The fixture arrays compared (an entry's first word: ``"name (what)"`` notes what was checked)."""
        return {n.split(" ")[0] for g in self.groups.values() for n in g.values}

    def worst(self, *names: str) -> float:
        return max(self.groups[n].worst() for n in names)


def renamed_replay(fixture: Fixture, method: str, index: int, run: Callable[[Case, torch.dtype, str], Replay],
                   directory: str) -> Replay:
    """Replay case ``index`` of ``method`` from :func:`renamed_copy` of ``fixture`` (made once per directory's
    parent): a file with other case keys, CLIP keys, case order, class names and seeds, the same maths."""
    path = os.path.join(os.path.dirname(directory), "renamed.npz")
    if not os.path.isfile(path):
        renamed_copy(fixture, path)
    keys = [c.key for c in fixture.cases((method,))]
    cases = Fixture(path).cases((method,))
    assert [c.key for c in cases] == [f"re_{k}" for k in reversed(keys)]
    return run(cases[index], torch.float64, directory)


class Replays:
    """Replays of a test module, run once per (case, dtype) and shared by its tests: ``run(case, dtype, dir)``."""

    DTYPES = {"float64": torch.float64, "float32": torch.float32}

    def __init__(self, factory: Any, fixture: Fixture, run: Callable[[Case, torch.dtype, str], Any]) -> None:
        self.factory, self.fixture, self.run, self.done = factory, fixture, run, {}

    def get(self, key: str, dtype: str = "float64") -> Any:
        if (key, dtype) not in self.done:
            directory = str(self.factory.mktemp(f"{key}_{dtype}"))
            self.done[key, dtype] = self.run(self.fixture.case(key), self.DTYPES[dtype], directory)
        return self.done[key, dtype]


# ------------------------------------------------------------------ the tests read everything from the file
def source_literals(path: str) -> list[tuple[int, str, str]]:
    """``(line, token type, text)`` of every number and string literal of a Python file, except on lines marked
    ``# literal-ok: <reason>``."""
    import tokenize

    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = []
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.NUMBER, tokenize.STRING) and "# literal-ok:" not in lines[tok.start[0] - 1]:
                out.append((tok.start[0], tokenize.tok_name[tok.type], tok.string))
    return out


COMMON = 4     # literal-ok: integers below this (indices, halves, pairs) are too common to flag
SETTINGS = 8   # literal-ok: arrays up to this size hold settings (n_ctx, alphas, ab_pairs, lr_used...)


def fixture_literals(fixture: Fixture) -> tuple[set, set]:
    """Numbers (array dimensions, values of small arrays, except integers below ``COMMON``) and names (case, CLIP,
    class, domain and dataset names) that a test reading everything from the file never spells out."""
    numbers: set = set()
    names: set = set(fixture.case_keys)
    for key, value in fixture.arrays.items():
        numbers |= {d for d in value.shape if d >= COMMON}
        if value.dtype.kind in "iuf" and value.size <= SETTINGS:
            numbers |= {v.item() for v in value.ravel() if not (float(v).is_integer() and abs(v) < COMMON)}
        if key.endswith(("__classnames", "__alldomain", "__dataset_name", "__clip_key")):
            names |= {str(v) for v in np.atleast_1d(value)}
    return numbers, names


def spelled_out(paths: list[str], numbers: set, names: set) -> list[tuple[str, int, str]]:
    found = []
    for path in paths:
        for line, kind, text in source_literals(path):
            if kind == "NUMBER":
                hit = ast.literal_eval(text) in numbers  # a NUMBER token is a plain literal
            else:
                inner = text.lstrip("rbfRBF")[1:-1].strip("'\"")
                hit = inner in names or any(inner.startswith(f"{n}__") for n in names)
            if hit:
                found.append((os.path.basename(path), line, text))
    return found


