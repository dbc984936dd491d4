"""Stacked training: the runs of a sweep that differ only in a few loss weights, trained as one vectorised run.

``train.py <run flags> --member DIR1 KEY V1 --member DIR2 KEY V2 ...`` builds one run per member exactly as
``train.py <run flags> --output-dir DIRk KEY Vk`` would (config, seed, trainer, ``log.txt``, ``config.yaml``),
then trains them in lockstep: every batch is drawn and its features encoded once, and the trainer's stack
object (``make_stack``) takes one vectorised optimisation step for all members (K x D x D weights, one pass).
Before any hook that reads weights (validation, checkpoints, the final test) the members get their slices
back, so every member writes the same checkpoints, ``record.json`` and ``done`` as its separate run; they agree
with separate runs to floating-point reassociation (tests: 1e-5 in float32).

A trainer takes part by setting ``STACK_KEYS`` (the config keys its members may differ in) and a class method
``make_stack(trainers)`` returning an object with ``step(batch, batch_idx) -> [loss summary per member]`` and
``sync()`` (weights and optimiser state back into the members). Members whose configs differ elsewhere, or a trainer without a stack, are run one after another
(a note says why). Random-number use is kept per run: every member is seeded before it is built, and the
global RNG is reset to the same state before each member's hooks, so a member sees the stream of its separate
run. A member that produces NaN/Inf stops alone (no record, no ``done``); the others finish; the command then
exits with the non-finite exit code.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Any, Callable, Optional


from ..config.checks import differing_keys
from ..utils.errors import ConfigError, UserError
from ..utils.logger import restore_stdout
from ..utils.meters import AverageMeter, MetricMeter
from ..utils.tools import rng_state, set_rng_state
from ..utils.torchtools import load_checkpoint
from . import guards
from .build import TRAINER_REGISTRY

NOT_COMPARED = ("OUTPUT_DIR",)


def member_args(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One parsed command line per ``--member DIR [KEY VALUE ...]`` (its output directory and overrides)."""
    if args.eval_only or args.no_train or args.output_dir:
        raise ConfigError("--member gives each run's output directory and trains them; it cannot be combined with "
                          "--output-dir, --eval-only or --no-train")
    out = []
    for spec in args.member:
        directory, overrides = spec[0], list(spec[1:])
        if len(overrides) % 2:
            raise ConfigError(f"--member {' '.join(spec)}: expected DIR followed by KEY VALUE pairs")
        member = copy.copy(args)
        member.member, member.output_dir = None, directory
        member.opts = list(args.opts or []) + overrides
        out.append(member)
    dirs = [m.output_dir for m in out]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"--member output directories must differ, got {dirs}")
    return out


def stack_blocker(cfgs: list[Any]) -> Optional[str]:
    """Why these member configs cannot train as one stack (None: they can)."""
    name = cfgs[0].TRAINER.NAME
    cls = TRAINER_REGISTRY.get(name)
    keys = tuple(getattr(cls, "STACK_KEYS", ()))
    if not keys or not callable(getattr(cls, "make_stack", None)):
        return f"trainer {name} has no stacked training"
    differ = sorted({k for c in cfgs[1:] for k in differing_keys(cfgs[0], c, ignore=NOT_COMPARED + keys)})
    if differ:
        return f"members differ in {', '.join(differ)} (a {name} stack may differ only in {', '.join(keys)})"
    return None


def run_stack(args: argparse.Namespace, entry: Any) -> list[dict[str, Any]]:
    """Train the ``--member`` runs of ``args``; ``entry`` is the ``train.py`` module (``setup_cfg``,
    ``open_session``, ``train_metrics``, ``run``). Returns the records of the members that finished."""
    members = member_args(args)
    cfgs = [entry.setup_cfg(m) for m in members]
    blocker = stack_blocker(cfgs)
    if blocker:
        print(f"Note: the {len(members)} runs are trained one after another ({blocker})")
        return [entry.run(m) for m in members]
    sessions: list[Any] = []
    try:
        for member, cfg in zip(members, cfgs):
            sessions.append(entry.open_session(member, cfg))  # each member seeded before it is built
        group = Lockstep(sessions, rng_state())
        group.train()
        records = []
        for s in group.live:
            s.activate()
            s.record.set("stack", {"members": len(sessions), "index": sessions.index(s),
                                   "output_dirs": [x.cfg.OUTPUT_DIR for x in sessions]})
            records.append(s.finish(entry.train_metrics(s)))
    finally:
        restore_stdout()
    if group.failed:
        raise guards.NonFiniteError(f"{len(group.failed)} of {len(sessions)} stacked runs stopped on non-finite "
                                    f"values: " + "; ".join(f"{d}: {m}" for d, m in group.failed))
    return records


class Lockstep:
    """K built runs trained together through their trainer's stack; hooks run per member, in its own log."""

    def __init__(self, sessions: list[Any], built_rng: tuple[Any, ...]) -> None:
        self.sessions = sessions
        self.live = list(sessions)
        self.failed: list[tuple[str, str]] = []
        self.built_rng = built_rng  # the RNG state right after building (equal for every member)

    def each(self, hook: Callable[[Any], None]) -> None:
        """Call ``hook(trainer)`` for every live member, in its log, from the same RNG state."""
        state = rng_state()
        for s in list(self.live):
            set_rng_state(state)
            s.activate()
            try:
                hook(s.trainer)
            except guards.NonFiniteError as err:
                self.fail(s, err)

    def fail(self, s: Any, err: Exception) -> None:
        """Stop one member (its log says why; no record, no ``done``); the others go on."""
        print(f"error: {err}")
        self.live.remove(s)
        self.failed.append((s.cfg.OUTPUT_DIR, str(err)))

    def check_weights(self) -> None:
        """After the members got their weights back: a non-finite weight stops that member before it saves."""
        def check(t: Any) -> None:
            bad = guards.nonfinite_tensors(t._models)
            if bad:
                guards.check_train_step(t, {name: float("nan") for name in bad})

        self.each(check)

    def train(self) -> None:
        trainers = [s.trainer for s in self.sessions]
        for t in trainers:  # older rolling checkpoints go once every member has saved the epoch (see rewind)
            t.defer_checkpoint_prune = True
        self.each(lambda t: t.before_train())
        starts = {s.trainer.start_epoch for s in self.sessions}
        if len(starts) == 1:  # every member at the same epoch: files older than its rolling checkpoint go
            for t in trainers:
                t.prune_checkpoints(t.output_dir)
        if len(starts) > 1 and not self.rewind(min(starts)):  # killed between the members' checkpoints
            self.one_by_one(f"members resume from different epochs {sorted(starts)}")
            return
        stack = type(trainers[0]).make_stack(trainers)
        lead = trainers[0]
        for epoch in range(lead.start_epoch, lead.max_epoch):
            def begin(t: Any, e: int = epoch) -> None:
                t.epoch = e
                t.before_epoch()

            self.each(begin)
            self.run_epoch(stack)
            stack.sync()
            self.check_weights()
            self.each(lambda t: t.after_epoch())
            for s in self.live:
                s.trainer.prune_checkpoints(s.trainer.output_dir)
        self.each(lambda t: t.after_train())

    def rewind(self, epoch: int) -> bool:
        """Bring members that resumed later back to their ``model.pth.tar-<epoch>`` checkpoints (a member's
        previous rolling checkpoint stays until every member has saved the next epoch); False when that is not
        possible (some member has none)."""
        ahead = [s for s in self.sessions if s.trainer.start_epoch > epoch]
        if epoch == 0:
            return False
        fname = f"model.pth.tar-{epoch}"
        for s in ahead:
            t = s.trainer
            paths = {n: os.path.join(t.output_dir, n, fname) for n in t.get_model_names()}
            if not all(os.path.isfile(p) for p in paths.values()):
                return False
        for s in ahead:  # restoring also sets the RNG state of that epoch (the same for every member)
            s.activate()
            t = s.trainer
            print(f"Rewinding to epoch {epoch}, the newest epoch every member of the stack has a checkpoint of")
            ckpts = {n: load_checkpoint(os.path.join(t.output_dir, n, fname)) for n in t.get_model_names()}
            t.start_epoch = t.restore_checkpoints(t.output_dir, fname, ckpts)
        return True

    def one_by_one(self, reason: str) -> None:
        print(f"Note: stacked training falls back to one run after another ({reason})")
        for s in self.sessions:
            s.trainer.defer_checkpoint_prune = False
            set_rng_state(self.built_rng)
            s.activate()
            s.trainer.train(s.trainer.start_epoch, s.trainer.max_epoch)

    def run_epoch(self, stack: Any) -> None:
        """One epoch over the first member's loader: one stacked step per batch, each member's progress line."""
        trainers = [s.trainer for s in self.sessions]
        loader = trainers[0].train_loader_x
        if loader is None or len(loader) == 0:
            raise UserError(f"dataset {trainers[0].cfg.DATASET.NAME} has no training images (train_x is empty)")
        meters = {id(s): MetricMeter() for s in self.sessions}
        batch_time, data_time = AverageMeter(), AverageMeter()
        for t in trainers:
            t.set_model_mode("train")
            t.num_batches = len(loader)
        end = time.time()
        for batch_idx, batch in enumerate(loader):
            data_time.update(time.time() - end)
            for t in trainers:
                t.batch_idx = batch_idx
            summaries = stack.step(batch, batch_idx)
            batch_time.update(time.time() - end)
            for s in list(self.live):
                self._log_member(s, summaries[self.sessions.index(s)], meters[id(s)], batch_time, data_time)
            end = time.time()

    def _log_member(self, s: Any, summary: dict[str, float], meter: MetricMeter, batch_time: AverageMeter,
                    data_time: AverageMeter) -> None:
        s.activate()
        bad = guards.nonfinite_terms(summary)  # the members' weights are checked after each epoch's sync
        if bad:
            try:
                guards.check_train_step(s.trainer, {name: float("nan") for name in bad})
            except guards.NonFiniteError as err:
                self.fail(s, err)
            return
        meter.update(summary)
        s.trainer.log_train_step(meter, batch_time, data_time)
