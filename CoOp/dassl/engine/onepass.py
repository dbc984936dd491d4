"""One evaluation pass over several open-set datasets: ``train.py --eval-only --eval-open-set C1 D1 ...``.

The runs ``--dataset-config-file Ci --output-dir Di`` would make, in one pass: the trainer is built (seeded) with
the first unfinished run's config and the model loaded once (and the training split of fitted scores passed
once). Per run, its ``<ID>_<OOD>`` dataset is drawn from the seed as a separate run would draw it (its
``train_x`` and class names must be the trainer's). Under the official draw order
(``DATASET.OPENSET_DRAW_ORDER official``) an open set's ID samples (``test``, ``val``) depend on the open set, so:

- a run whose ID samples are the pass's (e.g. no class reached a cap) reuses the pass's accuracy, ID split, KNN
  bank and ID-side scores (``shared_pass.id_side`` ``shared``), then collects its open-set split from the random
  state a separate run has there;
- any other run replays a separate run on its own samples (``id_side`` ``own``): from the random state a
  separate run has after loading the model, accuracy on its ``test``, its ID split, its open-set split and its
  ``val``, through loaders over its own lists.

Images already encoded in the pass under the test transform are not encoded again (:mod:`.image_memo`, an
in-memory memo keyed by transform and image path; not for randomly transformed images, not with the feature
cache, which already serves features). :meth:`SimpleTrainer.set_ood_test` swaps the open-set loader and
:func:`ood_eval.detect_open_set` scores each run into its directory.

Like :mod:`dassl.engine.stacked`, this module takes what it needs from the entry point as a parameter (``entry``,
the ``train.py`` module): ``setup_cfg``, ``identity_of``, ``claim_run_dir``, ``seed_run``, ``print_header``,
``start_record`` and its start-up buffer / log helpers (``_StartupBuffer``, ``_open_log``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from ..config.checks import differing_keys
from ..data import DataManager
from ..utils.errors import ConfigError, DataError, UserError
from ..utils.logger import restore_stdout
from ..utils.tools import collect_env_info, rng_state, set_random_seed, set_rng_state
from .build import TRAINER_REGISTRY, build_trainer
from .identity import replace_run
from .image_memo import ImageMemo
from .ood_eval import detect_open_set
from .records import is_done
from .score_fit import FittedStats


def open_set_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One command line per ``--eval-open-set`` pair: what ``--dataset-config-file C --output-dir D`` gives."""
    if not args.eval_only:
        raise ConfigError("--eval-open-set evaluates a trained model: add --eval-only (and --model-dir)")
    if args.dataset_config_file or args.output_dir or args.member:
        raise ConfigError("--eval-open-set names each run's dataset config and output directory; drop "
                          "--dataset-config-file/--output-dir (and --member)")
    dirs = [os.path.abspath(d) for _, d in args.eval_open_set]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"--eval-open-set: an output directory is named twice: {dirs}")
    return [argparse.Namespace(**{**vars(args), "dataset_config_file": c, "output_dir": d})
            for c, d in args.eval_open_set]


def check_one_pass(cfgs: list[Any]) -> None:
    """Runs share a model (and, where their samples agree, the ID side) only if their configs differ in nothing
    but the open-set dataset, and the trainer derives the same model settings from each dataset name (its
    ``dataset_signature``, if it has one)."""
    signature = getattr(TRAINER_REGISTRY.get(cfgs[0].TRAINER.NAME), "dataset_signature", None)
    for cfg in cfgs[1:]:
        keys = differing_keys(cfgs[0], cfg, ignore=("DATASET.NAME", "OUTPUT_DIR"))
        if keys:
            raise ConfigError(f"--eval-open-set: {cfg.DATASET.NAME} and {cfgs[0].DATASET.NAME} differ in more than "
                              f"DATASET.NAME (in {', '.join(keys)}); evaluate them in separate runs")
        if callable(signature) and signature(cfg) != signature(cfgs[0]):
            raise ConfigError(f"--eval-open-set: {cfgs[0].TRAINER.NAME} builds its model differently for "
                              f"{cfg.DATASET.NAME} ({signature(cfg)}) and {cfgs[0].DATASET.NAME} "
                              f"({signature(cfgs[0])}); evaluate them in separate runs")


def _items(ds: Any, split: str) -> list[tuple[str, int]]:
    return [(d.impath, d.label) for d in getattr(ds, split) or []]


def _id_split_mismatch(a: Any, b: Any, splits: tuple[str, ...] = ("train_x", "val", "test")) -> str:
    """The first of ``splits`` (or the class names) two ``<ID>_<OOD>`` datasets disagree on; "" if none."""
    for split in splits:
        if _items(a, split) != _items(b, split):
            return split
    return "" if a.classnames == b.classnames else "classnames"


class _KeepRNG:
    """Saves the python, numpy and torch random states on entry and restores them on exit."""

    def __enter__(self) -> "_KeepRNG":
        self.state = rng_state()
        return self

    def __exit__(self, *exc: Any) -> None:
        set_rng_state(self.state)


def _open_set_data(cfg: Any, trainer: Any) -> tuple[Any, Any]:
    """The dataset of one run of the pass, drawn as that run alone would draw it (re-seeded, the pass's random
    state kept), and python's random state right after that draw (the run's own from there on); its
    ``train_x`` and class names must be the trainer's (they are for the open sets of one ID dataset)."""
    with _KeepRNG():
        if cfg.SEED >= 0:
            set_random_seed(cfg.SEED, cfg.DETERMINISTIC)
        ds = DataManager(cfg).dataset
        py_state = random.getstate()
    bad = _id_split_mismatch(trainer.dm.dataset, ds, ("train_x",))
    if bad:
        raise DataError(f"--eval-open-set: {cfg.DATASET.NAME} and {trainer.cfg.DATASET.NAME} draw different ID "
                        f"{bad} lists; evaluate them in separate runs")
    return ds, py_state


def _with_python(state: tuple[Any, ...], py_state: Any) -> tuple[Any, ...]:
    """``state`` (:func:`rng_state`) with python's component replaced by ``py_state`` (None: kept)."""
    return state if py_state is None else (py_state, *state[1:])


@contextlib.contextmanager
def _own_id_loaders(trainer: Any, ds: Any, memo: Optional[ImageMemo]) -> Iterator[None]:
    """Within the block the trainer's ``val`` / ``test`` loaders run over ``ds``'s own lists, built as a separate
    run builds them (through the feature cache or the memo); the pass's loaders are put back afterwards."""
    saved = trainer.val_loader, trainer.test_loader
    cache = getattr(trainer, "feature_cache", None)

    def loader(items: list[Any], split: str) -> Any:
        if not items:
            return None
        built = cache.eval_loader(items, split) if cache is not None else trainer.dm.build_eval_loader(items)
        return memo.wrap(built, "test") if memo is not None else built

    trainer.val_loader, trainer.test_loader = loader(ds.val, "val"), loader(ds.test, "test")
    try:
        yield
    finally:
        trainer.val_loader, trainer.test_loader = saved


@dataclass
class OnePass:
    """What the runs of one ``--eval-open-set`` pass share (computed once)."""

    trainer: Any
    test_metrics: dict[str, Any]
    id_outs: dict[str, Any]          # TEST.OOD_ID_SPLIT outputs (empty when the dataset has no open-set split)
    after_load: tuple[Any, ...]      # random state a separate run has after loading the model
    before_ood: tuple[Any, ...]      # random state a separate run collects its open-set split from
    info: dict[str, Any]             # the record's ``shared_pass`` block
    memo: Optional[ImageMemo] = None  # features of the images the pass encoded (test transform)
    id_scores: dict[tuple[str, str], Any] = field(default_factory=dict)  # (score, split) of the ID side
    val_out: Optional[dict[str, Any]] = None  # val outputs (the KNN bank), collected by the first run
    fitted: FittedStats = field(default_factory=FittedStats)  # fitted scores' statistics (training split, once)


def evaluate_open_sets(args: argparse.Namespace, entry: Any) -> dict[str, Any]:
    """``--eval-only --eval-open-set C1 D1 --eval-open-set C2 D2 ...``: the runs ``--dataset-config-file Ci
    --output-dir Di`` would make, in one pass.

    The trainer is built (seeded) with the first unfinished run's config and the model loaded once; closed-set
    accuracy and the ID split of that run are collected once and reused by every run drawing the same ID
    samples (``val``, the KNN bank, by the first of them; the training split of fitted scores once for all);
    a run with other ID samples collects its own (module docstring). Each open-set split is collected from the
    random state a separate run would have and scored with every ``TEST.OOD_SCORES`` entry. Each directory gets
    its own ``log.txt`` (its header, the shared part, its own part), ``config.yaml``, ``args.json``, artifacts,
    ``record.json`` (with a ``shared_pass`` block) and then ``done``; a directory whose run (same fingerprint) is
    done is skipped, one done by another run is refused unless ``--rerun-changed``. A failing open-set dataset
    fails only its run (the error is raised at the end).
    Returns ``{"records": {dir: record}, "skipped": [dirs]}``.
    """
    runs = open_set_runs(args)
    all_cfgs = [entry.setup_cfg(a) for a in runs]
    done = [is_done(a.output_dir, entry.identity_of(a, c)["fingerprint"]) for a, c in zip(runs, all_cfgs)]
    skipped = [a.output_dir for a, d in zip(runs, done) if d]
    todo = [a for a, d in zip(runs, done) if not d]
    for d in skipped:
        print(f"{d}: done (skipped)")
    if not todo:
        return {"records": {}, "skipped": skipped}
    cfgs = [c for c, d in zip(all_cfgs, done) if not d]
    for a, cfg in zip(todo, cfgs):
        entry.claim_run_dir(a, cfg)  # refuse a directory of another run before anything is built
    check_one_pass(cfgs)
    env_info = collect_env_info()
    headers = []
    for a, cfg in zip(todo, cfgs):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            if cfg.SEED >= 0:
                print(f"Setting fixed seed: {cfg.SEED}")
            entry.print_header(a, cfg, env_info)
        headers.append(buf.getvalue())
    console = sys.stdout
    log = entry._StartupBuffer(console)
    t0 = time.time()
    console.write(headers[0])
    sys.stdout = log
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            entry.seed_run(cfgs[0])
        print(f"** One evaluation pass for {len(todo)} open-set runs ({', '.join(c.DATASET.NAME for c in cfgs)}): "
              f"the model is loaded once (trainer built with {cfgs[0].DATASET.NAME}); open sets drawing the same ID "
              f"samples share {cfgs[0].TEST.SPLIT} accuracy and the ID side, images are encoded once **")
        trainer = build_trainer(cfgs[0])
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
        memo, no_memo = ImageMemo.install(trainer)
        if memo is not None:
            trainer.val_loader, trainer.test_loader = memo.wrap(trainer.val_loader, "test"), memo.wrap(
                trainer.test_loader, "test")
        after_load = rng_state()
        test_metrics = dict(trainer.test(split=cfgs[0].TEST.SPLIT))
        id_split = cfgs[0].TEST.OOD_ID_SPLIT
        id_outs = {id_split: trainer.collect_outputs(id_split)} if trainer.ood_test_loader is not None else {}
    finally:
        sys.stdout = console
    info = {"runs": [a.output_dir for a in runs], "built_with": cfgs[0].DATASET.NAME, "model_loads": 1,
            "shared_seconds": round(time.time() - t0, 3), "encoder_images": int(trainer.encoder_images),
            "memo": "in memory, test transform" if memo is not None else f"off: {no_memo}"}
    one = OnePass(trainer, test_metrics, id_outs, after_load, rng_state(), info, memo)
    records: dict[str, Any] = {}
    errors: list[Exception] = []
    for i, (a, cfg) in enumerate(zip(todo, cfgs)):
        try:
            records[a.output_dir] = _open_set_run(a, cfg, one, i, headers[i] + log.getvalue(), entry)
        except UserError as err:
            restore_stdout()
            print(f"error: {cfg.DATASET.NAME} ({a.output_dir}): {err}", file=sys.stderr)
            errors.append(err)
    if errors:
        raise errors[0]
    return {"records": records, "skipped": skipped}


def _open_set_run(args: argparse.Namespace, cfg: Any, one: OnePass, index: int, log_head: str,
                  entry: Any) -> dict[str, Any]:
    """One run of the pass: its dataset and open-set loader, log, detection, record then ``done``."""
    trainer = one.trainer
    console = sys.stdout
    section = entry._StartupBuffer(console)
    sys.stdout = section
    try:
        print(f"** Open-set run {index + 1} of the pass: {cfg.DATASET.NAME} **")
        ds, py_state = (trainer.dm.dataset, None) if index == 0 else _open_set_data(cfg, trainer)
        shared = _id_split_mismatch(trainer.dm.dataset, ds, ("val", "test")) == ""
        if not shared:
            print(f"{cfg.DATASET.NAME} draws its own ID samples: accuracy and the ID side are collected for it")
        if ds.ood_test:
            trainer.set_ood_test(ds.ood_test)
            if one.memo is not None:
                trainer.ood_test_loader = one.memo.wrap(trainer.ood_test_loader, cfg.DATALOADER.OOD_TEST.TRANSFORM)
    finally:
        sys.stdout = console
    if entry.claim_run_dir(args, cfg):
        replace_run(cfg.OUTPUT_DIR)
    logger = entry._open_log(cfg.OUTPUT_DIR, log_head + section.getvalue())
    try:
        record = entry.start_record(args, cfg, trainer, ds)
        record.set("model_dir", args.model_dir)
        t0, enc0 = time.time(), trainer.encoder_images
        served0 = one.memo.served if one.memo is not None and index > 0 else 0  # the first counts the shared part
        metrics = _shared_id_side(cfg, ds, one, py_state) if shared else _own_id_side(cfg, ds, one, py_state)
        record.data["timings"]["run_seconds"] = round(time.time() - t0, 3)
        if getattr(trainer, "feature_cache_stats", None) is not None:
            record.set("feature_cache", dict(trainer.feature_cache_stats))
        # encoder passes: the shared part's are counted in the pass's first record (sums over records stay exact)
        own = trainer.encoder_images - enc0 + (one.info["encoder_images"] if index == 0 else 0)
        record.data["timings"]["encoder_images"] = int(own)
        served = {"memo_served": one.memo.served - served0} if one.memo is not None else {}
        record.set("shared_pass", dict(one.info, position=index, id_side="shared" if shared else "own", **served))
        for name, values in metrics.items():
            record.add_metrics(name, values)
        path = record.write(cfg.OUTPUT_DIR)
        print(f"Run record written to {path}")
        return record.data
    finally:
        if sys.stdout is logger:
            restore_stdout()


def _shared_id_side(cfg: Any, ds: Any, one: OnePass, py_state: Any) -> dict[str, Any]:
    """A run whose ID samples are the pass's: the pass's accuracy, ID split, KNN bank and ID-side scores; its
    open-set split collected from the random state a separate run has there."""
    trainer = one.trainer
    metrics: dict[str, Any] = {"test": one.test_metrics}
    if ds.ood_test and one.id_outs:
        set_rng_state(_with_python(one.before_ood, py_state))
        outs = dict(one.id_outs, ood_test=trainer.collect_outputs("ood_test"))
        if trainer.val_loader is not None and "val" not in outs:
            if one.val_out is None:
                one.val_out = trainer.collect_outputs("val")
            outs["val"] = one.val_out
        metrics.update(detect_open_set(trainer, outs, cfg, one.id_scores, one.fitted))
    return metrics


def _own_id_side(cfg: Any, ds: Any, one: OnePass, py_state: Any) -> dict[str, Any]:
    """A run with its own ID samples: what a separate run computes after loading the model (its random state,
    then accuracy, ID split, open-set split and ``val`` over its own lists, as ``ood_eval.run_evaluation``);
    only the fitted scores' statistics (the common ``train_x``) and the memo's features are the pass's."""
    trainer = one.trainer
    with _own_id_loaders(trainer, ds, one.memo):
        set_rng_state(_with_python(one.after_load, py_state))
        metrics: dict[str, Any] = {"test": dict(trainer.test(split=cfg.TEST.SPLIT))}
        if ds.ood_test and trainer.ood_test_loader is not None:
            id_split = cfg.TEST.OOD_ID_SPLIT
            outs = {id_split: trainer.collect_outputs(id_split), "ood_test": trainer.collect_outputs("ood_test")}
            if trainer.val_loader is not None and "val" not in outs:
                outs["val"] = trainer.collect_outputs("val")
            metrics.update(detect_open_set(trainer, outs, cfg, {}, one.fitted))
    return metrics
