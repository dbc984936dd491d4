"""Entry point with the Dassl/CoOp command line.

    python train.py --root DATA --seed 1 --trainer CRoFT \
        --dataset-config-file configs/datasets/PACS.yaml --config-file configs/trainers/CRoFT/rn50_ep30.yaml \
        --output-dir output/... [KEY VALUE ...]

Every module of ``trainers/`` and ``datasets/`` is imported at start-up (drop a file there to add a trainer or
dataset). Config precedence: defaults < CoOp compatibility keys < trainer ``extend_cfg`` hooks < dataset yaml <
trainer yaml < flags < trailing ``KEY VALUE`` overrides. Each run writes ``log.txt``, the resolved ``config.yaml``/``args.json``, checkpoints,
then ``record.json`` and a ``done`` marker. User errors print one line and exit with code 2; nothing is written
when a run fails before training starts. NaN/Inf losses, gradients or logits print one line and exit with code 3
(no ``record.json``, no ``done``; the last good checkpoint stays).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from dassl.config import COMPAT_KEYS, add_coop_config, cfg_to_dict, clean_cfg, get_cfg_default
from dassl.config.checks import check_ignored_keys, differing_keys, trainer_node
from dassl.config.validate import validate_cfg
from dassl.engine import TRAINER_REGISTRY, RunRecord, build_trainer
from dassl.engine.records import is_done
from dassl.engine.protocol import protocol_block
from dassl.engine.guards import NonFiniteError
from dassl.engine.ood_eval import detect_open_set, run_evaluation
from dassl.utils import collect_env_info, set_random_seed
from dassl.utils.errors import ConfigError, UserError
from dassl.utils.logger import Logger, restore_stdout
from dassl.utils.plugins import load_plugins
from dassl.utils.tools import atomic_write_json, atomic_write_text, rng_state, set_rng_state


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=str, default="", help="path to the datasets folder")
    parser.add_argument("--output-dir", type=str, default="", help="output directory of this run")
    parser.add_argument("--resume", type=str, default="", help="checkpoint directory to resume from "
                        "(default: the output directory itself)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (0 is valid; <0 = no seeding)")
    parser.add_argument("--transforms", type=str, nargs="+", help="training data augmentation")
    parser.add_argument("--config-file", type=str, default="", help="trainer config file")
    parser.add_argument("--dataset-config-file", type=str, default="", help="dataset config file")
    parser.add_argument("--trainer", type=str, default="", help="trainer name (e.g. CRoFT, CoOp, ZeroshotCLIP)")
    parser.add_argument("--backbone", type=str, default="", help="CLIP backbone name (e.g. RN50, ViT-B/16)")
    parser.add_argument("--device", type=str, default="", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--eval-only", action="store_true", help="evaluation only")
    parser.add_argument("--model-dir", type=str, default="", help="load model from this directory for eval-only")
    parser.add_argument("--load-epoch", type=int, help="load model weights at this epoch for evaluation")
    parser.add_argument("--no-train", action="store_true", help="do not call trainer.train()")
    parser.add_argument("--member", nargs="+", action="append", metavar="DIR [KEY VALUE ...]",
                        help="train several runs as one stack (vectorised; e.g. a lambda sweep): each --member gives "
                             "a run's output directory and its own KEY VALUE overrides (see dassl.engine.stacked)")
    parser.add_argument("--eval-open-set", nargs=2, action="append", metavar=("DATASET_CONFIG_FILE", "OUTPUT_DIR"),
                        help="with --eval-only, instead of --dataset-config-file/--output-dir (repeatable): one "
                             "evaluation run per pair, all in one pass (model loaded and ID splits run once); "
                             "each directory gets the records of its own run, a done one is skipped")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="modify config options using the command line (KEY VALUE pairs)")
    return parser


PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def extend_cfg(cfg: Any) -> None:
    """Import the plug-ins (every module of ``trainers/`` and ``datasets/``), add the CoOp/Dassl compatibility
    keys, then call every registered trainer class's ``extend_cfg(cfg)`` and every plug-in module's CoOp-style
    module-level ``extend_cfg(cfg)`` (in that order)."""
    modules = load_plugins(PLUGIN_DIR)
    add_coop_config(cfg)
    for name in TRAINER_REGISTRY.registered_names():
        hook = getattr(TRAINER_REGISTRY.get(name), "extend_cfg", None)
        if callable(hook):
            hook(cfg)
    for module in modules:
        hook = getattr(module, "extend_cfg", None)
        if callable(hook) and getattr(hook, "__module__", None) == module.__name__:
            hook(cfg)


def reset_cfg(cfg: Any, args: argparse.Namespace) -> None:
    if args.root:
        cfg.DATASET.ROOT = args.root
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    if args.resume:
        cfg.RESUME = args.resume
    if args.seed is not None:
        cfg.SEED = args.seed
    if args.transforms:
        cfg.INPUT.TRANSFORMS = args.transforms
    if args.trainer:
        cfg.TRAINER.NAME = args.trainer
    if args.backbone:
        cfg.MODEL.BACKBONE.NAME = args.backbone
    if args.device:
        cfg.DEVICE = args.device


def _merge(fn: Any, what: str) -> None:
    try:
        fn()
    except KeyError as err:
        msg = str(err).strip("'\"")
        raise ConfigError(f"{what}: {msg}") from None
    except (ValueError, TypeError, AssertionError) as err:
        raise ConfigError(f"{what}: {err}") from None


def coerce_numbers(cfg: Any, opts: list[str]) -> list[str]:
    """Let ``KEY 15`` set a float key (yacs would reject the int); everything else is left to yacs."""
    from ast import literal_eval

    out = list(opts)
    for i in range(0, len(out) - 1, 2):
        node, parts = cfg, out[i].split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        current = node.get(parts[-1]) if isinstance(node, dict) else None
        if isinstance(current, float) and not isinstance(current, bool):
            try:
                value = literal_eval(out[i + 1])
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                out[i + 1] = repr(float(value))
    return out


def setup_cfg(args: argparse.Namespace) -> Any:
    cfg = get_cfg_default()
    extend_cfg(cfg)
    defaults = cfg.clone()
    for path, what in ((args.dataset_config_file, "dataset config"), (args.config_file, "trainer config")):
        if path:
            if not os.path.isfile(path):
                raise ConfigError(f"{what} file not found: {path}")
            _merge(lambda p=path: cfg.merge_from_file(p), f"{what} {path}")
    reset_cfg(cfg, args)
    opts = list(args.opts or [])
    if opts and opts[0] == "--":
        opts = opts[1:]
    if len(opts) % 2:
        raise ConfigError(f"trailing overrides must be KEY VALUE pairs, got {len(opts)} items: {opts}")
    _merge(lambda: cfg.merge_from_list(coerce_numbers(cfg, opts)), "override")
    if not cfg.TRAINER.NAME:
        raise ConfigError("no trainer given: use --trainer NAME")
    node = trainer_node(TRAINER_REGISTRY.get(cfg.TRAINER.NAME), cfg.TRAINER.NAME)  # fails early with suggestions
    validate_cfg(cfg)  # value ranges of the engine and of this trainer (one line naming key and range)
    check_ignored_keys(cfg, defaults, node, cfg.TRAINER.NAME, exempt=COMPAT_KEYS)
    clean_cfg(cfg, node)  # config.yaml / record.json hold only the running trainer's node
    cfg.freeze()
    return cfg


class _StartupBuffer(io.StringIO):
    """Holds stdout until the run directory may be created (nothing is written if start-up fails)."""

    def __init__(self, console: Any) -> None:
        super().__init__()
        self.console = console

    def write(self, msg: str) -> int:
        self.console.write(msg)
        return super().write(msg)

    def flush(self) -> None:
        self.console.flush()


def _open_log(output_dir: str, buffered: str) -> Logger:
    os.makedirs(output_dir, exist_ok=True)
    fpath = os.path.join(output_dir, "log.txt")
    if os.path.exists(fpath):
        fpath += time.strftime("-%Y-%m-%d-%H-%M-%S")
    console = sys.stdout.console if hasattr(sys.stdout, "console") else sys.stdout
    logger = Logger(fpath, console)
    logger.file.write(buffered)
    sys.stdout = logger
    return logger


def seed_run(cfg: Any) -> None:
    """Seed the run (``SEED`` >= 0) and switch on deterministic algorithms when asked for."""
    if cfg.SEED >= 0:
        print(f"Setting fixed seed: {cfg.SEED}")
        set_random_seed(cfg.SEED, cfg.DETERMINISTIC)
    if cfg.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)


def print_header(args: argparse.Namespace, cfg: Any, env_info: str = "") -> None:
    """The Dassl start-of-log block: arguments, resolved config, system info."""
    print("***************")
    print("** Arguments **")
    print("***************")
    for key in sorted(vars(args)):
        print(f"{key}: {getattr(args, key)}")
    print("************")
    print("** Config **")
    print("************")
    print(cfg)
    print("Collecting env info ...")
    print("** System info **\n" + (env_info or collect_env_info()) + "\n")


def start_record(args: argparse.Namespace, cfg: Any, trainer: Any, dataset: Any) -> RunRecord:
    """Write ``config.yaml``/``args.json`` (and a dataset's ``class_split.json``); a record with the run's
    protocol block and precision."""
    atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump())
    atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "args.json"), vars(args))
    split_record = getattr(dataset, "split_record", None)
    if callable(split_record):  # e.g. the ImageNet46 class split of this seed
        atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "class_split.json"), split_record())
    record = RunRecord(cfg_to_dict(cfg), vars(args), mode="eval" if args.eval_only else "train")
    notes = getattr(dataset, "protocol_notes", None)
    record.set("protocol", protocol_block(record.data["config"], notes() if callable(notes) else None))
    # precision requested vs used (CPU always fp32); trainers that never take PREC run fp32
    record.set("precision", getattr(trainer, "precision_info", {"requested": "fp32", "used": "fp32"}))
    return record


class RunSession:
    """One run between start-up and its record: config, trainer, log and the record being filled."""

    def __init__(self, args: argparse.Namespace, cfg: Any, trainer: Any, logger: Logger, record: RunRecord) -> None:
        self.args, self.cfg, self.trainer, self.logger, self.record = args, cfg, trainer, logger, record
        self.t0 = time.time()

    def activate(self) -> None:
        """Send prints to this run's ``log.txt`` (and the console)."""
        sys.stdout = self.logger

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Fill timings, cache statistics and metrics, write ``record.json`` then ``done``; return the record."""
        record, trainer = self.record, self.trainer
        record.data["timings"]["run_seconds"] = round(time.time() - self.t0, 3)
        if getattr(trainer, "feature_cache_stats", None) is not None:  # batches served from the cache
            record.set("feature_cache", dict(trainer.feature_cache_stats))
        record.data["timings"]["encoder_images"] = int(getattr(trainer, "encoder_images", 0))
        for section, values in metrics.items():
            record.add_metrics(section, values)
        if self.args.eval_only or not self.args.no_train:
            path = record.write(self.cfg.OUTPUT_DIR)
            print(f"Run record written to {path}")
        return record.data


def open_session(args: argparse.Namespace, cfg: Optional[Any] = None) -> RunSession:
    """Seed, build the trainer (nothing written if that fails), open ``log.txt``, write ``config.yaml``,
    ``args.json`` and the run record's start; stdout is left on the run's log."""
    cfg = cfg if cfg is not None else setup_cfg(args)
    console = sys.stdout.console if hasattr(sys.stdout, "console") else sys.stdout
    buffer = _StartupBuffer(console)
    sys.stdout = buffer
    try:
        seed_run(cfg)
        print_header(args, cfg)
        trainer = build_trainer(cfg)
    finally:
        sys.stdout = console
    logger = _open_log(cfg.OUTPUT_DIR, buffer.getvalue())
    try:
        record = start_record(args, cfg, trainer, trainer.dm.dataset)
    except BaseException:
        restore_stdout()
        raise
    return RunSession(args, cfg, trainer, logger, record)


def train_metrics(session: RunSession) -> dict[str, Any]:
    """After training: the trainer's metrics; best epoch and validation history go into the record."""
    session.record.set("best_epoch", session.trainer.best_epoch)
    session.record.set("val_history", session.trainer.val_history)
    return session.trainer.metrics


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run one job; return its record (also written to ``<output-dir>/record.json``).

    With ``--member`` the runs of a stack are trained together (:mod:`dassl.engine.stacked`); the records of
    all members are returned as ``{"stack": [...]}``. With ``--eval-open-set``: one evaluation pass over several
    open-set runs (:func:`evaluate_open_sets`).
    """
    args = get_parser().parse_args(argv)
    if args.eval_open_set:
        return evaluate_open_sets(args)
    if args.member:
        from dassl.engine.stacked import run_stack

        return {"stack": run_stack(args, sys.modules[__name__])}
    return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One run from parsed arguments: train (or evaluate), then write its record."""
    session = open_session(args)
    try:
        trainer = session.trainer
        if args.eval_only:
            trainer.load_model(args.model_dir, epoch=args.load_epoch)
            session.record.set("model_dir", args.model_dir)
            metrics = run_evaluation(trainer)
        elif not args.no_train:
            trainer.train(trainer.start_epoch, trainer.max_epoch)
            metrics = train_metrics(session)
        else:
            metrics = {}
        return session.finish(metrics)
    finally:
        if sys.stdout is session.logger:
            restore_stdout()


# ------------------------------------------------------------------------ --eval-open-set: one evaluation pass
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
    """Runs share a model and ID splits only if their configs differ in nothing but the open-set dataset, and the
    trainer derives the same model settings from each dataset name (its ``dataset_signature``, if it has one)."""
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


def _id_split_mismatch(a: Any, b: Any) -> str:
    """The first ID split (or the class names) two ``<ID>_<OOD>`` datasets disagree on; "" if none."""
    for split in ("train_x", "val", "test"):
        if [(d.impath, d.label) for d in getattr(a, split) or []] != [(d.impath, d.label) for d in getattr(b, split) or []]:
            return split
    return "" if a.classnames == b.classnames else "classnames"


class _KeepRNG:
    """Saves the python, numpy and torch random states on entry and restores them on exit."""

    def __enter__(self) -> "_KeepRNG":
        self.state = rng_state()
        return self

    def __exit__(self, *exc: Any) -> None:
        set_rng_state(self.state)


def _open_set_data(cfg: Any, trainer: Any) -> Any:
    """The dataset of one run of the pass, drawn as that run alone would draw it (re-seeded, the pass's random
    state kept); its ID splits must be the trainer's."""
    from dassl.data import DataManager
    from dassl.utils.errors import DataError

    with _KeepRNG():
        if cfg.SEED >= 0:
            set_random_seed(cfg.SEED, cfg.DETERMINISTIC)
        ds = DataManager(cfg).dataset
    bad = _id_split_mismatch(trainer.dm.dataset, ds)
    if bad:
        raise DataError(f"--eval-open-set: {cfg.DATASET.NAME} and {trainer.cfg.DATASET.NAME} draw different ID "
                        f"{bad} lists; evaluate them in separate runs")
    return ds


@dataclass
class OnePass:
    """What the runs of one ``--eval-open-set`` pass share (computed once)."""

    trainer: Any
    test_metrics: dict[str, Any]
    id_outs: dict[str, Any]          # TEST.OOD_ID_SPLIT outputs (empty when the dataset has no open-set split)
    before_ood: tuple[Any, ...]      # random state a separate run collects its open-set split from
    info: dict[str, Any]             # the record's ``shared_pass`` block
    id_scores: dict[tuple[str, str], Any] = field(default_factory=dict)  # (score, split) of the ID side
    val_out: Optional[dict[str, Any]] = None  # val outputs (the KNN bank), collected by the first run


def evaluate_open_sets(args: argparse.Namespace) -> dict[str, Any]:
    """``--eval-only --eval-open-set C1 D1 --eval-open-set C2 D2 ...``: the runs ``--dataset-config-file Ci
    --output-dir Di`` would make, in one pass.

    The trainer is built (seeded) with the first unfinished run's config, the model loaded once, closed-set
    accuracy and the ID split collected once (``val``, the KNN bank, once by the first run); each open-set split is
    then collected from the random state a separate run would have and scored with every ``TEST.OOD_SCORES``
    entry. Each directory gets its own ``log.txt`` (its header, the shared part, its own part), ``config.yaml``,
    ``args.json``, artifacts, ``record.json`` (with a ``shared_pass`` block) and then ``done``; a directory that
    is already done is skipped. A failing open-set dataset fails only its run (the error is raised at the end).
    Returns ``{"records": {dir: record}, "skipped": [dirs]}``.
    """
    runs = open_set_runs(args)
    skipped = [a.output_dir for a in runs if is_done(a.output_dir)]
    todo = [a for a in runs if not is_done(a.output_dir)]
    for d in skipped:
        print(f"{d}: done (skipped)")
    if not todo:
        return {"records": {}, "skipped": skipped}
    cfgs = [setup_cfg(a) for a in todo]
    check_one_pass(cfgs)
    env_info = collect_env_info()
    headers = []
    for a, cfg in zip(todo, cfgs):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            if cfg.SEED >= 0:
                print(f"Setting fixed seed: {cfg.SEED}")
            print_header(a, cfg, env_info)
        headers.append(buf.getvalue())
    console = sys.stdout
    log = _StartupBuffer(console)
    t0 = time.time()
    console.write(headers[0])
    sys.stdout = log
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            seed_run(cfgs[0])
        print(f"** One evaluation pass for {len(todo)} open-set runs ({', '.join(c.DATASET.NAME for c in cfgs)}): "
              f"the model, {cfgs[0].TEST.SPLIT} accuracy and the ID side are computed once (trainer built with "
              f"{cfgs[0].DATASET.NAME}) **")
        trainer = build_trainer(cfgs[0])
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
        test_metrics = dict(trainer.test(split=cfgs[0].TEST.SPLIT))
        id_split = cfgs[0].TEST.OOD_ID_SPLIT
        id_outs = {id_split: trainer.collect_outputs(id_split)} if trainer.ood_test_loader is not None else {}
    finally:
        sys.stdout = console
    info = {"runs": [a.output_dir for a in runs], "built_with": cfgs[0].DATASET.NAME, "model_loads": 1,
            "shared_seconds": round(time.time() - t0, 3), "encoder_images": int(trainer.encoder_images)}
    one = OnePass(trainer, test_metrics, id_outs, rng_state(), info)
    records: dict[str, Any] = {}
    errors: list[Exception] = []
    for i, (a, cfg) in enumerate(zip(todo, cfgs)):
        try:
            records[a.output_dir] = _open_set_run(a, cfg, one, i, headers[i] + log.getvalue())
        except UserError as err:
            restore_stdout()
            print(f"error: {cfg.DATASET.NAME} ({a.output_dir}): {err}", file=sys.stderr)
            errors.append(err)
    if errors:
        raise errors[0]
    return {"records": records, "skipped": skipped}


def _open_set_run(args: argparse.Namespace, cfg: Any, one: OnePass, index: int, log_head: str) -> dict[str, Any]:
    """One run of the pass: its dataset and open-set loader, log, detection, record then ``done``."""
    trainer = one.trainer
    console = sys.stdout
    section = _StartupBuffer(console)
    sys.stdout = section
    try:
        print(f"** Open-set run {index + 1} of the pass: {cfg.DATASET.NAME} **")
        ds = trainer.dm.dataset if index == 0 else _open_set_data(cfg, trainer)
        if ds.ood_test:
            trainer.set_ood_test(ds.ood_test)
    finally:
        sys.stdout = console
    logger = _open_log(cfg.OUTPUT_DIR, log_head + section.getvalue())
    try:
        record = start_record(args, cfg, trainer, ds)
        record.set("model_dir", args.model_dir)
        t0, enc0 = time.time(), trainer.encoder_images
        metrics: dict[str, Any] = {"test": one.test_metrics}
        if ds.ood_test and one.id_outs:
            set_rng_state(one.before_ood)
            outs = dict(one.id_outs, ood_test=trainer.collect_outputs("ood_test"))
            if trainer.val_loader is not None and "val" not in outs:
                if one.val_out is None:
                    one.val_out = trainer.collect_outputs("val")
                outs["val"] = one.val_out
            metrics.update(detect_open_set(trainer, outs, cfg, one.id_scores))
        record.data["timings"]["run_seconds"] = round(time.time() - t0, 3)
        if getattr(trainer, "feature_cache_stats", None) is not None:
            record.set("feature_cache", dict(trainer.feature_cache_stats))
        # encoder passes: the shared part's are counted in the pass's first record (sums over records stay exact)
        own = trainer.encoder_images - enc0 + (one.info["encoder_images"] if index == 0 else 0)
        record.data["timings"]["encoder_images"] = int(own)
        record.set("shared_pass", dict(one.info, position=index))
        for name, values in metrics.items():
            record.add_metrics(name, values)
        path = record.write(cfg.OUTPUT_DIR)
        print(f"Run record written to {path}")
        return record.data
    finally:
        if sys.stdout is logger:
            restore_stdout()


def cli(argv: Optional[Sequence[str]] = None) -> int:
    try:
        main(argv)
    except UserError as err:
        restore_stdout()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        restore_stdout()
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        restore_stdout()
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
