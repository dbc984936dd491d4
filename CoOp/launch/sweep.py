"""Restartable sweeps: a list of ``train.py`` jobs, skipped when their ``done`` marker exists.

Jobs are executed by a launcher chosen by name (:mod:`launch.launchers`: ``workers``, the default persistent
worker processes; ``process``, one ``python train.py`` per job; ``inprocess``; plug-ins such as ``slurm``).
A failing job never stops the sweep; failures are listed at the end and the exit code is non-zero. Every sweep
writes a manifest (``<output_root>/sweeps/<name>.json``) naming all planned run directories, so collectors can
report missing runs by name.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from dassl.utils.tools import atomic_write_json, read_json
from launch.entry import COOP_DIR
from launch.launchers import DEFAULT_LAUNCHER, LaunchOptions, add_launcher_args, make_launcher  # noqa: F401


@dataclass
class Job:
    """One ``train.py`` invocation and how collectors should label it.

    ``parts``: the runs of a job that writes several run directories (``train.py --eval-open-set``, or a stack of
    runs trained as one with ``train.py --member``), each a dict with ``name``, ``output_dir`` and ``labels``; the manifest lists them one by one and the job is done when they
    all are. Empty: the job is the one run ``name``/``output_dir``/``labels``.
    """

    name: str
    output_dir: str
    argv: list[str]
    labels: dict[str, Any] = field(default_factory=dict)
    parts: list[dict[str, Any]] = field(default_factory=list)  # an evaluation pass or a stack: its runs

    def runs(self) -> list[dict[str, Any]]:
        """The runs (name, output_dir, labels) the manifest lists for this job."""
        return self.parts or [{"name": self.name, "output_dir": self.output_dir, "labels": self.labels}]

    def run_dirs(self) -> list[str]:
        """Every run directory this job writes."""
        return [r["output_dir"] for r in self.parts] or [self.output_dir]

    def runs_done(self) -> int:
        return sum(os.path.isfile(os.path.join(d, "done")) for d in self.run_dirs())

    def done(self) -> bool:
        return self.runs_done() == len(self.run_dirs())

    def command(self) -> list[str]:
        return [sys.executable, "train.py", *self.argv]


def quote(argv: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def write_manifest(output_root: str, sweep_name: str, jobs: list[Job]) -> str:
    path = os.path.join(output_root, "sweeps", f"{sweep_name}.json")
    existing = read_json(path)["jobs"] if os.path.isfile(path) else []
    seen = {j["output_dir"] for j in existing}
    runs = [dict(r, argv=j.argv) for j in jobs for r in j.runs()]  # every run directory, by name
    merged = existing + [r for r in runs if r["output_dir"] not in seen]
    atomic_write_json(path, {"sweep": sweep_name, "jobs": merged})
    return path


def read_manifests(output_root: str) -> list[dict[str, Any]]:
    folder = os.path.join(output_root, "sweeps")
    if not os.path.isdir(folder):
        return []
    jobs = []
    for f in sorted(os.listdir(folder)):
        if f.endswith(".json"):
            jobs.extend(read_json(os.path.join(folder, f))["jobs"])
    return jobs


def run_jobs(jobs: list[Job], launcher: str = DEFAULT_LAUNCHER, num_workers: int = 1,
             devices: Optional[Sequence[str]] = None, dry_run: bool = False, quiet: bool = True,
             retry: bool = False, sweep_dir: str = "", args: Any = None, runner: Any = None) -> int:
    """Run the unfinished jobs with the named launcher (:mod:`launch.launchers`), or with ``runner`` (a launcher
    instance that may be reused across calls); return the number of failures."""
    todo = [j for j in jobs if not j.done()]
    planned, done = sum(len(j.run_dirs()) for j in jobs), sum(j.runs_done() for j in jobs)
    multi = planned != len(jobs)  # some job writes several runs (an evaluation pass, a stack)
    unit = "jobs" if multi else "runs"
    print(f"{planned} runs planned, {done} already done, {planned - done} to run"
          + (f" ({len(todo)} of {len(jobs)} jobs)" if multi else ""))
    if dry_run:
        for j in jobs:
            print(("[done] " if j.done() else "[todo] ") + j.name)
            for d in (j.run_dirs() if len(j.run_dirs()) > 1 else []):
                print(("    [done] " if os.path.isfile(os.path.join(d, "done")) else "    [todo] ") + d)
            print("    python train.py " + quote(j.argv))
        return 0
    if not todo:
        return 0
    options = LaunchOptions(jobs=max(1, num_workers), devices=list(devices) if devices else None, quiet=quiet,
                            retry=retry, sweep_dir=sweep_dir, args=args if args is not None else argparse.Namespace())
    runner = runner or make_launcher(launcher, options)
    failures: list[tuple[str, str]] = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(todo), desc=unit, unit=unit[:-1], file=sys.stderr) if tqdm else None

    def report(job: Job, ok: bool, msg: str) -> None:
        if not ok:
            failures.append((job.name, msg))
            print(f"FAILED {job.name}: {msg}", file=sys.stderr)
        if bar is not None:
            bar.update(1)

    runner.run(todo, report)
    if bar is not None:
        bar.close()
    if failures:
        print(f"{len(failures)} of {len(todo)} {unit} failed:")
        for name, msg in failures:
            print(f"  {name}: {msg}")
    else:
        print(f"all {len(todo)} {unit} finished")
    return len(failures)


def stack_keys(trainer: str) -> tuple[str, ...]:
    """The config keys in which the runs of a ``trainer`` stack may differ (empty: no stacked training)."""
    from dassl.engine import TRAINER_REGISTRY
    from dassl.utils.plugins import load_plugins

    if trainer not in TRAINER_REGISTRY:
        load_plugins(COOP_DIR)  # registers the trainers of trainers/ (as train.py does)

    return tuple(getattr(TRAINER_REGISTRY.get(trainer), "STACK_KEYS", ())) if trainer in TRAINER_REGISTRY else ()


def _parts(argv: list[str]) -> tuple[list[str], list[str], str]:
    """(flags before ``--output-dir``, the KEY VALUE overrides after it, the output directory)."""
    i = argv.index("--output-dir")
    return argv[:i], argv[i + 2:], argv[i + 1]


def stack_jobs(jobs: list[Job]) -> list[Job]:
    """Merge the unfinished training jobs that differ only in their trainer's ``STACK_KEYS`` (e.g. CRoFT's λ1/λ2
    with the same seed, domain and config) into one ``train.py --member ...`` job each; others are unchanged."""
    groups: dict[tuple, list[tuple[Job, list[str]]]] = {}
    order: list[Any] = []
    for job in jobs:
        keys = stack_keys(job.labels.get("trainer", "")) if "--output-dir" in job.argv else ()
        if job.done() or not keys or job.parts:
            order.append(job)
            continue
        flags, opts, _ = _parts(job.argv)
        pairs = list(zip(opts[::2], opts[1::2]))
        base = tuple((k, v) for k, v in pairs if k not in keys)
        own = [x for k, v in pairs if k in keys for x in (k, v)]
        key = (tuple(flags), base)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((job, own))
    out = []
    for item in order:
        if isinstance(item, Job):
            out.append(item)
            continue
        members = groups[item]
        if len(members) == 1:
            out.append(members[0][0])
            continue
        flags, base = list(item[0]), [x for kv in item[1] for x in kv]
        argv = flags + [x for job, own in members for x in ("--member", job.output_dir, *own)] + ["--", *base]
        first = members[0][0]
        out.append(Job(f"{first.name} (+{len(members) - 1} stacked)", first.output_dir, argv,
                       dict(first.labels, stacked=len(members)), parts=[job.runs()[0] for job, _ in members]))
    if len(out) < len(jobs):
        print(f"--stack: {len(jobs)} runs in {len(out)} jobs (runs differing only in their stack keys train as one)")
    return out


def split_opts(argv: Optional[Sequence[str]]) -> tuple[list[str], list[str]]:
    """Split a driver command line at ``--``: (driver flags, yacs ``KEY VALUE`` overrides for every run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def runnable(jobs: list[Job], evaluate: bool) -> list[Job]:
    """Evaluation jobs whose training run has not finished are left out (and reported)."""
    if not evaluate:
        return jobs
    missing = [j for j in jobs if not os.path.isfile(os.path.join(j.labels["train_dir"], "done"))]
    if missing:
        print(f"{len(missing)} evaluation runs have no finished training run yet (skipped), e.g. "
              f"{missing[0].labels['train_dir']}")
    return [j for j in jobs if j not in missing]


def drive(args: Any, jobs: list[Job], evaluate: bool, manifest_name: str) -> int:
    """Record the planned jobs in the manifest, run the runnable ones; exit code 1 if any failed."""
    root = args.eval_root if evaluate else args.output_root
    if not args.dry_run:
        write_manifest(root, manifest_name, jobs)
    todo = jobs if args.dry_run else runnable(jobs, evaluate)  # a dry run lists every planned job
    if getattr(args, "stack", False) and not evaluate:
        todo = stack_jobs(todo)
    failures = run_jobs(todo, launcher=args.launcher, num_workers=args.jobs,
                        devices=args.devices, dry_run=args.dry_run, quiet=not args.verbose,
                        retry=getattr(args, "retry", False), sweep_dir=os.path.join(root, "sweeps", manifest_name),
                        args=args)
    return 1 if failures else 0


def plan_sweep(module: Any, argv: Optional[Sequence[str]], trainer: Optional[str],
               evaluate: bool) -> tuple[Any, list[Job]]:
    """Parse a driver command line with ``module.get_parser`` and plan ``module.train_jobs``/``eval_jobs``.

    Raises SystemExit (with the message) on bad input, such as a missing data root.
    """
    argv, opts = split_opts(argv)
    args = module.get_parser(trainer, evaluate).parse_args(argv)
    args.opts = opts
    if not args.root:
        raise SystemExit("error: no data root: pass --root DIR or set DATA=DIR")
    args.root = os.path.abspath(os.path.expanduser(args.root))
    for key in ("output_root", "eval_root"):  # relative roots are relative to the CoOp folder (as before)
        if getattr(args, key, None):
            setattr(args, key, os.path.join(COOP_DIR, os.path.expanduser(getattr(args, key))))
    make = module.eval_jobs if evaluate else module.train_jobs
    return args, [j for t in args.trainer for j in make(args, t)]


def sweep_main(module: Any, name: str, argv: Optional[Sequence[str]], trainer: Optional[str],
               evaluate: bool) -> int:
    """A driver's ``main``: plan, record the manifest ``<name>_{train,eval}``, run; 2 on bad input."""
    try:
        args, jobs = plan_sweep(module, argv, trainer, evaluate)
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            return 2
        raise
    return drive(args, jobs, evaluate, f"{name}_eval" if evaluate else f"{name}_train")
