"""Run identities of a sweep's planned jobs (:mod:`dassl.engine.identity`).

* every planned run gets the fingerprint ``train.py`` will compute for it (its config resolved as ``train.py``
  resolves it; an evaluation run's includes the planned training run's), so a directory counts as done only when
  its ``done`` belongs to that fingerprint (``Job.fingerprint``, ``parts[i]["fingerprint"]``);
* :func:`changed_runs` lists the planned directories that hold a finished run (or checkpoints) of another
  fingerprint, with the differing keys;
* :func:`plan_entries` says, per run, whether it is the run the driver's preset plans for that directory (the same
  command without the flags and overrides that change values: ``--epochs``, ``--shots``, explicit CRoFT values,
  ``--backbone``, ``-- KEY VALUE``); the manifest keeps it, so collectors never label another run as the preset's.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Any, Optional

from dassl.engine.identity import differences, holds_run, stored_identity
from dassl.utils.errors import UserError
from launch.entry import COOP_DIR, train_module

# driver flags whose values change what a run computes (the preset's own values are what the plan uses)
VALUE_FLAGS = ("epochs", "shots", "lambda1", "lambda2", "ratios", "gen_step", "eval_ratio", "eval_ratio_text")


def _abs(path: str) -> str:
    return path if not path or os.path.isabs(path) else os.path.join(COOP_DIR, path)


class Planner:
    """Resolves jobs' command lines into run identities (configs memoised by command line)."""

    def __init__(self) -> None:
        self.train = train_module()
        self._cfgs: dict[str, Any] = {}

    def namespaces(self, argv: list[str]) -> list[argparse.Namespace]:
        """One parsed ``train.py`` command line per run directory of a job (stacks and one-pass evaluations)."""
        ns = self.train.get_parser().parse_args(argv)
        ns.config_file, ns.dataset_config_file = _abs(ns.config_file), _abs(ns.dataset_config_file)
        if ns.eval_open_set:
            from dassl.engine.onepass import open_set_runs

            ns.eval_open_set = [[_abs(c), d] for c, d in ns.eval_open_set]
            return open_set_runs(ns)
        if ns.member:
            from dassl.engine.stacked import member_args

            return member_args(ns)
        return [ns]

    def cfg(self, ns: argparse.Namespace) -> Any:
        key = json.dumps({k: v for k, v in vars(ns).items() if k != "output_dir"}, sort_keys=True, default=str)
        if key not in self._cfgs:
            self._cfgs[key] = self.train.setup_cfg(ns)
        return self._cfgs[key]

    def identities(self, argv: list[str], models: Optional[dict[str, dict]] = None) -> dict[str, dict[str, Any]]:
        """``{output_dir: identity}`` of a job's runs; evaluation runs use ``models[abspath(model_dir)]`` (the
        planned training run) when given, else what the model directory holds."""
        out = {}
        for ns in self.namespaces(argv):
            model = (models or {}).get(os.path.abspath(ns.model_dir)) if ns.eval_only and ns.model_dir else None
            out[os.path.abspath(ns.output_dir)] = self.train.identity_of(ns, self.cfg(ns), model)
        return out


def attach(jobs: list[Any], planner: Optional[Planner] = None, models: Optional[dict[str, dict]] = None,
           only_existing: bool = False) -> Planner:
    """Give every run of ``jobs`` its planned identity (``job.identities``) and fingerprint; ``only_existing``:
    only jobs with a directory on disk (a dry run lists the others as to do without resolving them). A config
    that cannot be resolved is one line naming the job (SystemExit)."""
    planner = planner or Planner()
    for job in jobs:
        if only_existing and not any(os.path.isdir(d) for d in job.run_dirs()):
            continue
        try:
            idents = planner.identities(job.argv, models)
        except UserError as err:
            raise SystemExit(f"error: {job.name}: {err}") from None
        job.identities = idents
        if job.parts:
            for part in job.parts:
                part["fingerprint"] = idents[os.path.abspath(part["output_dir"])]["fingerprint"]
        else:
            job.fingerprint = idents[os.path.abspath(job.output_dir)]["fingerprint"]
    return planner


def changed_runs(jobs: list[Any]) -> list[tuple[Any, str, list[str]]]:
    """(job, directory, ``KEY: old -> new`` list) for every planned directory holding a finished run or
    checkpoints of another fingerprint than planned."""
    out = []
    for job in jobs:
        for d, ident in getattr(job, "identities", {}).items():
            if holds_run(d):
                stored = stored_identity(d)
                if stored is None or stored.get("fingerprint") != ident["fingerprint"]:
                    out.append((job, d, differences(stored, ident)))
    return out


# TEST keys a trained model's weights depend on (the others set how a run is tested and scored)
WEIGHT_TEST_KEYS = ("TEST.FINAL_MODEL",)


def evaluated_model(model_dir: str, planned: dict[str, Any]) -> dict[str, Any]:
    """The identity of the model an evaluation of ``model_dir`` will record: the finished training run's own when
    it differs from the ``planned`` one only in how runs are tested and scored (``TEST.*``, e.g. open-set score
    keys given to the evaluation command alone), else the planned one (a model of another configuration)."""
    from dassl.config.checks import differing_keys
    from dassl.engine.records import is_done
    from yacs.config import CfgNode as CN

    stored = stored_identity(model_dir) if is_done(model_dir) else None
    if stored is None or stored.get("fingerprint") == planned.get("fingerprint") or \
            stored.get("mode") != planned.get("mode"):
        return planned
    keys = differing_keys(CN(stored.get("fingerprinted", {})), CN(planned.get("fingerprinted", {})))
    scoring_only = keys and all(k.startswith("TEST.") and k not in WEIGHT_TEST_KEYS for k in keys)
    return stored if scoring_only else planned


def model_fingerprint(job: Any) -> Optional[str]:
    """The planned fingerprint of the training run an evaluation job evaluates (None: not known)."""
    for ident in getattr(job, "identities", {}).values():
        return (ident.get("model") or {}).get("fingerprint")
    return None


def reference_args(args: argparse.Namespace, keep: tuple[str, ...] = ()) -> argparse.Namespace:
    """The driver's command line as its preset plans it: value-changing flags (but ``keep``) and ``-- KEY VALUE``
    dropped."""
    ref = copy.copy(args)
    for key in VALUE_FLAGS:
        if hasattr(ref, key) and key not in keep:
            setattr(ref, key, None)
    if hasattr(ref, "backbone"):
        ref.backbone = ""
    ref.opts = []
    return ref


def preset_identities(module: Any, args: argparse.Namespace, evaluate: bool, planner: Planner,
                      keep: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{output_dir: identity}`` of the runs the preset plans for the same selection (datasets, configs,
    domains, seeds, ...; ``keep``: value flags kept as given); empty when the preset cannot plan them (e.g. a
    trainer the setup cannot run)."""
    ref = reference_args(args, keep)
    try:
        train = [j for t in ref.trainer for j in module.train_jobs(ref, t)]
        jobs = [j for t in ref.trainer for j in module.eval_jobs(ref, t)] if evaluate else train
        models: dict[str, dict] = {}
        if evaluate:
            for j in train:
                models.update(planner.identities(j.argv))
        out: dict[str, dict[str, Any]] = {}
        for j in jobs:
            out.update(planner.identities(j.argv, models))
        return out
    except (SystemExit, UserError):
        return {}


def plan_entries(jobs: list[Any], preset: str, reference: dict[str, dict[str, Any]],
                 same_shots: Optional[dict[str, dict[str, Any]]] = None) -> None:
    """Set ``job.plan[dir]``: ``{"preset", "fingerprint"`` (the preset's run for that directory, or None),
    ``"differences"`` (``KEY: preset -> planned``)``}`` for the manifest. A directory the preset does not plan
    (other shots, a CRoFT value outside its grid) has no fingerprint; its differences are taken against the
    preset's run with the same shots (``same_shots``) when there is one."""
    for job in jobs:
        job.plan = {}
        for d, ident in getattr(job, "identities", {}).items():
            ref = reference.get(d)
            if ref is not None:
                diff = [] if ref["fingerprint"] == ident["fingerprint"] else differences(ref, ident)
            else:
                near = (same_shots or {}).get(d)
                diff = ["not a run of the preset's plan"] + (
                    differences(near, ident) if near and near["fingerprint"] != ident["fingerprint"] else [])
            job.plan[d] = {"preset": preset, "fingerprint": ref["fingerprint"] if ref else None, "differences": diff}
