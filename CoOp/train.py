"""Entry point with the Dassl/CoOp command line.

    python train.py --root DATA --seed 1 --trainer CRoFT \
        --dataset-config-file configs/datasets/PACS.yaml --config-file configs/trainers/CRoFT/rn50_ep30.yaml \
        --output-dir output/... [KEY VALUE ...]

Every module of ``trainers/`` and ``datasets/`` is imported at start-up (drop a file there to add a trainer or
dataset). Config precedence: defaults < CoOp compatibility keys < trainer ``extend_cfg`` hooks < dataset yaml <
trainer yaml < flags < trailing ``KEY VALUE`` overrides. Each run writes ``log.txt``, the resolved ``config.yaml``/``args.json``,
``identity.json`` (its fingerprint), rolling checkpoints, then ``record.json`` and a ``done`` marker; a directory holding
another run is refused unless ``--rerun-changed``. User errors print one line and exit with code 2; nothing is written
when a run fails before training starts. NaN/Inf losses, gradients or logits print one line and exit with code 3
(no ``record.json``, no ``done``; the last good checkpoint stays).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Any, Optional, Sequence

import torch

from clip_backbone.loader import weights_provenance
from dassl.config import COMPAT_KEYS, add_coop_config, cfg_to_dict, clean_cfg, get_cfg_default
from dassl.config.checks import check_ignored_keys, trainer_node
from dassl.config.loading import merge_yaml_file
from dassl.config.validate import validate_cfg
from dassl.engine import TRAINER_REGISTRY, RunRecord, build_trainer
from dassl.engine.identity import describe, differences, holds_run, replace_run, run_identity, stored_identity
from dassl.engine.identity import write_identity
from dassl.engine.protocol import protocol_block
from dassl.engine.guards import NonFiniteError
from dassl.engine.ood_eval import run_evaluation
from dassl.utils import collect_env_info, set_random_seed
from dassl.utils.errors import ConfigError, UserError
from dassl.utils.logger import Logger, open_log, restore_stdout
from dassl.utils.plugins import load_plugins
from dassl.utils.tools import atomic_write_json, atomic_write_text


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
    parser.add_argument("--rerun-changed", action="store_true",
                        help="the output directory holds a finished run or checkpoints of another configuration "
                             "(fingerprint): replace that run (default: refuse, naming the differing keys)")
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
            _merge(lambda p=path, w=what: merge_yaml_file(cfg, p, w), f"{what} {path}")  # YAML errors: file:line
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
    check_init_weights(cfg)
    validate_cfg(cfg)  # value ranges of the engine and of this trainer (one line naming key and range)
    check_ignored_keys(cfg, defaults, node, cfg.TRAINER.NAME, exempt=COMPAT_KEYS)
    clean_cfg(cfg, node)  # config.yaml / record.json hold only the running trainer's node
    cfg.freeze()
    return cfg


def check_init_weights(cfg: Any) -> None:
    """``MODEL.INIT_WEIGHTS`` (upstream CoOp's prompt initialisation) only for trainers that read it."""
    path = cfg.MODEL.INIT_WEIGHTS
    if not path:
        return
    if not getattr(TRAINER_REGISTRY.get(cfg.TRAINER.NAME), "READS_INIT_WEIGHTS", False):
        readers = [n for n in TRAINER_REGISTRY.registered_names()
                   if getattr(TRAINER_REGISTRY.get(n), "READS_INIT_WEIGHTS", False)]
        raise ConfigError(f"MODEL.INIT_WEIGHTS {path}: {cfg.TRAINER.NAME} does not read it (the prompt trainers "
                          f"{', '.join(readers)} initialise their prompt learner from it); drop the key")
    if not os.path.isfile(path):
        raise ConfigError(f"MODEL.INIT_WEIGHTS file not found: {path} (a checkpoint of the prompt learner, e.g. "
                          f"<run>/prompt_learner/model-best.pth.tar)")


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
    """The run's one ``log.txt`` (live; a run started again in the directory appends after a marker line)."""
    os.makedirs(output_dir, exist_ok=True)
    console = sys.stdout.console if hasattr(sys.stdout, "console") else sys.stdout
    logger = open_log(os.path.join(output_dir, "log.txt"), console, buffered)
    sys.stdout = logger
    return logger


def identity_of(args: argparse.Namespace, cfg: Any, model: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The run's identity (:mod:`dassl.engine.identity`); an evaluation run's includes the evaluated model's
    (``model``, else what ``--model-dir`` holds)."""
    if not args.eval_only:
        return run_identity(cfg, "train")
    if model is None and args.model_dir and os.path.isdir(args.model_dir):
        model = stored_identity(args.model_dir)
    return run_identity(cfg, "eval", model=model, load_epoch=args.load_epoch)


def claim_run_dir(args: argparse.Namespace, cfg: Any) -> bool:
    """Whether the output directory must be emptied for this run: it holds another run's leftovers, or (with
    ``--rerun-changed``) a finished run or checkpoints of another fingerprint; without the flag, the latter is a
    one-line error naming the differing keys. A directory of this run's fingerprint is continued (resume)."""
    out = cfg.OUTPUT_DIR
    stored = stored_identity(out) if os.path.isdir(out) else None
    identity = identity_of(args, cfg)
    if stored is not None and stored.get("fingerprint") == identity["fingerprint"]:
        return False
    if not holds_run(out):
        return stored is not None  # a run that stopped before its first checkpoint: nothing to keep
    if getattr(args, "rerun_changed", False):
        return True
    what = "a finished run" if os.path.isfile(os.path.join(out, "done")) else "checkpoints of a run"
    raise ConfigError(f"{out} holds {what} with another configuration ({describe(differences(stored, identity))}); "
                      f"pass --rerun-changed to replace it, or choose another --output-dir")


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
    """Write ``config.yaml``/``args.json``/``identity.json`` (and a dataset's ``class_split.json``); a record
    with the run's identity, protocol block and precision."""
    identity = identity_of(args, cfg)
    atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump())
    atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "args.json"), vars(args))
    write_identity(cfg.OUTPUT_DIR, identity)
    split_record = getattr(dataset, "split_record", None)
    if callable(split_record):  # e.g. the ImageNet46 class split of this seed
        atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "class_split.json"), split_record())
    record = RunRecord(cfg_to_dict(cfg), vars(args), mode="eval" if args.eval_only else "train")
    record.set_identity(identity)
    notes = getattr(dataset, "protocol_notes", None)
    record.set("protocol", protocol_block(record.data["config"], notes() if callable(notes) else None))
    # precision requested vs used (CPU always fp32); trainers that never take PREC run fp32
    record.set("precision", getattr(trainer, "precision_info", {"requested": "fp32", "used": "fp32"}))
    if cfg.MODEL.BACKBONE.NAME:  # provenance: which weights file (sha256 computed once per file version)
        record.set("weights", weights_provenance(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.WEIGHTS))
        w = record.data["weights"]
        print(f"CLIP weights: {w['path']}" + (f" (sha256 {w['sha256']})" if w["sha256"] else ""))
    data_report = getattr(dataset, "data_report", None)
    if callable(data_report):  # e.g. per-domain image counts of the domain rule, data warnings
        record.set("data", data_report())
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
    ``args.json``, ``identity.json`` and the run record's start; stdout is left on the run's log. A directory
    holding another run is refused (or, ``--rerun-changed``, emptied once start-up succeeded)."""
    cfg = cfg if cfg is not None else setup_cfg(args)
    claim_run_dir(args, cfg)  # refuse early: nothing built, nothing written
    console = sys.stdout.console if hasattr(sys.stdout, "console") else sys.stdout
    buffer = _StartupBuffer(console)
    sys.stdout = buffer
    try:
        seed_run(cfg)
        print_header(args, cfg)
        trainer = build_trainer(cfg)
    finally:
        sys.stdout = console
    if claim_run_dir(args, cfg):
        replace_run(cfg.OUTPUT_DIR)
    logger = _open_log(cfg.OUTPUT_DIR, buffer.getvalue())
    try:
        record = start_record(args, cfg, trainer, trainer.dm.dataset)
    except BaseException:
        restore_stdout()
        raise
    trainer.run_fingerprint = record.data["fingerprint"]  # its checkpoints carry it; others are refused
    return RunSession(args, cfg, trainer, logger, record)


def train_metrics(session: RunSession) -> dict[str, Any]:
    """After training: the trainer's metrics; best epoch and validation history go into the record."""
    session.record.set("best_epoch", session.trainer.best_epoch)
    session.record.set("val_history", session.trainer.val_history)
    if session.trainer.segments:  # one per process that trained the run (a resumed run has several)
        session.record.set_segments(session.trainer.segments)
    return session.trainer.metrics


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run one job; return its record (also written to ``<output-dir>/record.json``).

    With ``--member`` the runs of a stack are trained together (:mod:`dassl.engine.stacked`); the records of
    all members are returned as ``{"stack": [...]}``. With ``--eval-open-set``: one evaluation pass over several
    open-set runs (:mod:`dassl.engine.onepass`).
    """
    args = get_parser().parse_args(argv)
    if args.eval_open_set:
        from dassl.engine.onepass import evaluate_open_sets

        return evaluate_open_sets(args, sys.modules[__name__])
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
