"""Restartable sweeps: a list of ``train.py`` jobs, skipped when their run is done (``done`` marker of the planned
fingerprint, :mod:`launch.runid`; a directory holding another run stops the driver unless ``--rerun-changed``).

Jobs are executed by a launcher chosen by name (:mod:`launch.launchers`: ``workers``, the default persistent
worker processes; ``process``, one ``python train.py`` per job; ``inprocess``; plug-ins such as ``slurm``).
A failing job never stops the sweep; failures are listed at the end and the exit code is non-zero. Every sweep
writes a manifest (``<output_root>/sweeps/<name>.json``) naming all planned run directories, so collectors can
report missing runs by name. A driver command starts its launcher before it resolves the plan (the workers import
while the driver plans) and keeps it for all its phases: a training command with ``--then-eval`` evaluates what it
trained in the same workers. It ends with a ``timings:`` line (``--timings FILE`` also writes them as JSON).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from launch.entry import COOP_DIR
from launch import launchers
from launch.jobs import Job  # noqa: F401  (drivers, demo and tests import Job from here)
from launch.launchers import DEFAULT_LAUNCHER, LaunchOptions, make_launcher  # noqa: F401
from launch.timings import CommandTimings


def quote(argv: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def write_manifest(output_root: str, sweep_name: str, jobs: list[Job]) -> str:
    """Record every planned run (name, directory, labels, argv, fingerprint and, from drivers, ``plan``: the
    preset's fingerprint for that directory); a directory planned again replaces its entry."""
    from dassl.utils.tools import atomic_write_json, read_json

    path = os.path.join(output_root, "sweeps", f"{sweep_name}.json")
    existing = read_json(path)["jobs"] if os.path.isfile(path) else []
    plans = {d: p for j in jobs for d, p in getattr(j, "plan", {}).items()}
    runs = {r["output_dir"]: dict(r, argv=j.argv, **({"plan": plans[os.path.abspath(r["output_dir"])]}
                                                      if os.path.abspath(r["output_dir"]) in plans else {}))
            for j in jobs for r in j.runs()}  # every run directory, by name
    merged = [runs.pop(r["output_dir"], r) for r in existing] + list(runs.values())
    atomic_write_json(path, {"sweep": sweep_name, "jobs": merged})
    return path


def read_manifests(output_root: str) -> list[dict[str, Any]]:
    from dassl.utils.tools import read_json

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
    instance that may be reused across calls); return the number of failures. A dry run lists every job:
    ``[done]``, ``[todo]`` or, for a directory holding another run, ``[changed: KEY: old -> new, ...]``."""
    todo, unit, text = job_summary(jobs, dry_run)
    print(text, end="")
    if dry_run or not todo:
        return 0
    options = LaunchOptions(jobs=max(1, num_workers), devices=list(devices) if devices else None, quiet=quiet,
                            retry=retry, sweep_dir=sweep_dir, args=args if args is not None else argparse.Namespace())
    return execute_jobs(todo, unit, runner or make_launcher(launcher, options))


def job_summary(jobs: list[Job], dry_run: bool = False) -> tuple[list[Job], str, str]:
    """(the unfinished jobs, ``"runs"`` or ``"jobs"``, the lines :func:`run_jobs` prints before it runs them:
    the counts and, for a dry run, every job with its state and command)."""
    from dassl.engine.identity import describe
    from dassl.engine.records import is_done
    from launch.runid import changed_runs

    todo = [j for j in jobs if not j.done()]
    planned, done = sum(len(j.run_dirs()) for j in jobs), sum(j.runs_done() for j in jobs)
    multi = planned != len(jobs)  # some job writes several runs (an evaluation pass, a stack)
    unit = "jobs" if multi else "runs"
    changed = {os.path.abspath(d): diff for _, d, diff in changed_runs(jobs)}
    lines = [f"{planned} runs planned, {done} already done, {planned - done} to run"
             + (f" ({len(todo)} of {len(jobs)} jobs)" if multi else "")
             + (f"; {len(changed)} of them replace a run of another configuration" if changed else "")]
    if dry_run:
        def tag(d: str, fingerprint: Optional[str]) -> str:
            if os.path.abspath(d) in changed:
                return f"[changed: {describe(changed[os.path.abspath(d)])}] "
            return "[done] " if is_done(d, fingerprint) else "[todo] "

        for j in jobs:
            runs = j.runs()
            lines.append((tag(runs[0]["output_dir"], runs[0].get("fingerprint") or None) if len(runs) == 1 else
                          "[done] " if j.done() else "[todo] ") + j.name)
            for r in (runs if len(runs) > 1 else []):
                lines.append("    " + tag(r["output_dir"], r.get("fingerprint") or None) + r["output_dir"])
            lines.append("    python train.py " + quote(j.argv))
    return todo, unit, "".join(line + "\n" for line in lines)


def execute_jobs(todo: list[Job], unit: str, runner: Any) -> int:
    """Run ``todo`` with the launcher ``runner`` (a progress bar on stderr, each failure reported as it happens,
    a summary at the end); return the number of failures."""
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

    try:
        runner.run(todo, report)
    finally:  # also when the launcher refuses the plan (SystemExit with its one-line reason)
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
        stacked = Job(f"{first.name} (+{len(members) - 1} stacked)", first.output_dir, argv,
                      dict(first.labels, stacked=len(members)), parts=[job.runs()[0] for job, _ in members])
        if all(hasattr(job, "identities") for job, _ in members):
            stacked.identities = {d: i for job, _ in members for d, i in job.identities.items()}
        out.append(stacked)
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
    """Evaluation jobs whose training run (of the planned fingerprint, when known) has not finished are left out
    (and reported)."""
    from dassl.engine.records import is_done
    from launch.runid import model_fingerprint

    if not evaluate:
        return jobs
    missing = [j for j in jobs if not is_done(j.labels["train_dir"], model_fingerprint(j))]
    if missing:
        print(f"{len(missing)} evaluation runs have no finished training run yet (skipped), e.g. "
              f"{missing[0].labels['train_dir']}")
    return [j for j in jobs if j not in missing]


def refuse_changed(jobs: list[Job], rerun: bool) -> list[Job]:
    """The jobs whose planned directories hold a run of another fingerprint; without ``rerun``, one line naming
    the first such directory and its differing keys (SystemExit)."""
    from dassl.engine.identity import describe
    from launch.runid import changed_runs

    changed = changed_runs(jobs)
    if changed and not rerun:
        _, d, diff = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise SystemExit(f"error: {d} holds a run of another configuration ({describe(diff)}){more}; pass "
                         f"--rerun-changed to replace it (--dry-run lists them)")
    marked = {id(job) for job, _, _ in changed}
    return [job for job in jobs if id(job) in marked]


def mark_replacements(jobs: list[Job], rerun: bool) -> None:
    """:func:`refuse_changed`; with ``rerun`` the jobs of such directories replace them (``train.py
    --rerun-changed`` empties a directory once the run's start-up succeeded)."""
    for job in refuse_changed(jobs, rerun):
        if "--rerun-changed" not in job.argv:
            job.argv = ["--rerun-changed", *job.argv]


def drive(args: Any, jobs: list[Job], evaluate: bool, manifest_name: str, runner: Any = None,
          timings: Optional[CommandTimings] = None) -> int:
    """Refuse (or, ``--rerun-changed``, replace) planned directories holding another run, record the planned
    jobs in the manifest, run the runnable ones (with ``runner``, a launcher kept by the caller, else one made
    from ``args``; its job times go to ``timings``); exit code 1 if any failed. The bookkeeping before the runs
    (:func:`prepare_phase`) runs in the launcher's first worker when it takes calls (:func:`in_worker`)."""
    sweep_dir = os.path.join(args.eval_root if evaluate else args.output_root, "sweeps", manifest_name)
    first, t0 = len(getattr(runner, "job_times", [])), time.time()
    ran, answer = in_worker(runner, "prepare_phase", args, jobs, evaluate, manifest_name)
    todo, unit, text = answer if ran else prepare_phase(args, jobs, evaluate, manifest_name)
    print(text, end="")
    if args.dry_run or not todo:
        return 0
    if runner is None:
        options = LaunchOptions(jobs=max(1, args.jobs), devices=list(args.devices) if args.devices else None,
                                quiet=not args.verbose, retry=getattr(args, "retry", False), sweep_dir=sweep_dir,
                                args=args)
        runner = make_launcher(args.launcher, options)
    else:  # one launcher for the command's phases (started early, see start_launcher)
        runner.options.sweep_dir = sweep_dir
    failures = execute_jobs(todo, unit, runner)
    if timings is not None:
        timings.add_phase("eval" if evaluate else "train", t0, time.time(), runner.job_times[first:])
    return 1 if failures else 0


def prepare_phase(args: Any, jobs: list[Job], evaluate: bool, manifest_name: str) -> tuple[list[Job], str, str]:
    """A phase's bookkeeping before its runs: refuse (or mark for replacement) directories of another run, write
    the manifest, leave out evaluations without a finished model, stack (``--stack``); returns
    :func:`job_summary` of what is left (a dry run: of every planned job, nothing written)."""
    if not args.dry_run:
        mark_replacements(jobs, getattr(args, "rerun_changed", False))
        write_manifest(args.eval_root if evaluate else args.output_root, manifest_name, jobs)
    todo = jobs if args.dry_run else runnable(jobs, evaluate)  # a dry run lists every planned job
    if getattr(args, "stack", False) and not evaluate:
        todo = stack_jobs(todo)
    return job_summary(todo, args.dry_run)


def in_worker(runner: Any, name: str, *args: Any) -> tuple[bool, Any]:
    """``(True, launch.sweep.<name>(*args))`` computed in the launcher's first worker when the launcher takes calls
    (``workers``: the code is imported there once for the jobs too, so the driver never imports torch & co.);
    ``(False, None)`` when it does not or that worker died (the caller computes it here)."""
    if getattr(runner, "call", None) is None:
        return False, None
    try:
        return True, runner.call(f"launch.sweep:{name}", *args)
    except launchers.WorkerLost as err:
        print(f"note: {err}; the driver plans by itself", file=sys.stderr)
        return False, None


def plan_sweep(module: Any, argv: Optional[Sequence[str]], trainer: Optional[str], evaluate: bool,
               then_eval: bool = False) -> tuple[Any, list[Job]]:
    """Parse a driver command line with ``module.get_parser`` and plan ``module.train_jobs``/``eval_jobs``;
    ``then_eval``: the evaluation jobs of a training command given ``--then-eval``.

    Raises SystemExit (with the message) on bad input, such as a missing data root.
    """
    args = parse_driver_args(module, argv, trainer, evaluate, then_eval)
    return args, plan_jobs(module, args, evaluate)


def parse_driver_args(module: Any, argv: Optional[Sequence[str]], trainer: Optional[str], evaluate: bool,
                      then_eval: bool = False) -> Any:
    """The parsed driver command line (``--`` overrides in ``args.opts``, roots made absolute); SystemExit on bad
    input. Imports nothing heavy: a driver starts its workers right after it."""
    argv, opts = split_opts(argv)
    parser = module.get_parser(trainer, evaluate)
    parser.add_argument("--then-eval", action="store_true", help=argparse.SUPPRESS if evaluate else
                        "after training, evaluate the trained models in the same command and worker processes "
                        "(the jobs the evaluation driver plans from the same flags)")
    args = parser.parse_args(argv)
    if evaluate and args.then_eval and not then_eval:
        raise SystemExit("error: --then-eval belongs to the training drivers (run_setup*.py ... --then-eval trains, "
                         "then evaluates); the evaluation driver only evaluates")
    args.opts = opts
    if not args.root:
        raise SystemExit("error: no data root: pass --root DIR or set DATA=DIR")
    args.root = os.path.abspath(os.path.expanduser(args.root))
    for key in ("output_root", "eval_root"):  # relative roots are relative to the CoOp folder (as before)
        if getattr(args, key, None):
            setattr(args, key, os.path.join(COOP_DIR, os.path.expanduser(getattr(args, key))))
    return args


def plan_jobs(module: Any, args: Any, evaluate: bool) -> list[Job]:
    """The jobs ``module.train_jobs``/``eval_jobs`` plan for parsed driver arguments (names checked first)."""
    if hasattr(module, "check_args"):  # names (domains, datasets, configs, ...) before anything is planned
        module.check_args(args, evaluate)
    make = module.eval_jobs if evaluate else module.train_jobs
    return [j for t in args.trainer for j in make(args, t)]


def resolve_plan(module: Any, args: Any, jobs: list[Job], evaluate: bool, planner: Any = None) -> Any:
    """Planned fingerprints of every run (:mod:`launch.runid`; evaluation runs include their planned training
    run's) and, for the manifest, each run's standing against the preset's plan. A dry run resolves only the
    runs whose directories exist. Returns the planner (configs memoised; pass it to the next call)."""
    from launch import runid

    planner = planner or runid.Planner()
    models: dict[str, dict] = {}
    if evaluate:  # the planned training runs of the evaluations resolved below
        train = [j for t in args.trainer for j in module.train_jobs(args, t)]
        wanted = {os.path.abspath(j.labels["train_dir"]) for j in jobs if "train_dir" in j.labels and
                  (not args.dry_run or any(os.path.isdir(d) for d in j.run_dirs()))}
        runid.attach([j for j in train if os.path.abspath(j.output_dir) in wanted], planner)
        models = {d: runid.evaluated_model(d, i) for j in train for d, i in getattr(j, "identities", {}).items()}
    runid.attach(jobs, planner, models, only_existing=args.dry_run)
    if not args.dry_run:
        reference = runid.preset_identities(module, args, evaluate, planner)
        same_shots = runid.preset_identities(module, args, evaluate, planner, ("shots",)) if args.shots else None
        runid.plan_entries(jobs, getattr(args, "preset", ""), reference, same_shots)
    return planner


def plan_phases(module: Any, args: Any, eval_args: Any, evaluate: bool) -> list[tuple[bool, Any, list[Job]]]:
    """The phases ``(evaluate, args, jobs)`` of a driver command, planned and resolved before anything runs: its
    own, then (``eval_args``: ``--then-eval``) the evaluation; a directory holding another run stops the command
    before training (SystemExit)."""
    phases = [(evaluate, args, plan_jobs(module, args, evaluate))]
    if eval_args is not None:
        phases.append((True, eval_args, plan_jobs(module, eval_args, True)))
    planner = None
    for ev, a, j in phases:
        planner = resolve_plan(module, a, j, ev, planner)
    if len(phases) > 1 and not args.dry_run:
        refuse_changed(phases[1][2], getattr(args, "rerun_changed", False))
    return phases


def plan_phases_of(module_name: str, args: Any, eval_args: Any, evaluate: bool) -> list[tuple[bool, Any, list[Job]]]:
    """:func:`plan_phases` of the driver module named ``module_name`` (what a worker runs for its driver)."""
    import importlib

    return plan_phases(importlib.import_module(module_name), args, eval_args, evaluate)


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    """The flags every driver shares: the launcher's (:func:`launch.launchers.add_launcher_args`) and
    ``--rerun-changed``."""
    launchers.add_launcher_args(p)
    p.add_argument("--rerun-changed", action="store_true",
                   help="replace planned runs whose directory holds a finished run or checkpoints of another "
                        "configuration (default: stop, naming the differing keys)")
    p.add_argument("--timings", metavar="FILE", default="",
                   help="also write where the command's seconds went (planning, each phase, each job) to FILE "
                        "as JSON (the summary line is printed at the end either way)")


def module_cli(main: Callable[..., int], name: str, argv: Optional[Sequence[str]] = None) -> int:
    """``python -m launch.<name> [--eval] FLAGS [-- KEY VALUE ...]``: the training driver (``--trainer``, default
    CRoFT), with ``--eval`` the evaluation driver (``main``: the driver module's)."""
    flags, opts = split_opts(argv)
    evaluate = "--eval" in flags
    if "-h" in flags or "--help" in flags:
        print(f"python -m launch.{name} [--eval] FLAGS: the training driver; with --eval the evaluation driver "
              f"(python -m launch.{name} --eval --help lists its flags)\n")
    return main([a for a in flags if a != "--eval"] + (["--", *opts] if opts else []), evaluate=evaluate)


def start_launcher(args: Any) -> Any:
    """The command's launcher, started before the plan is resolved (the workers import while the driver plans)
    and kept for all its phases (the caller closes it); None for a dry run."""
    if args.dry_run:
        return None
    options = LaunchOptions(jobs=max(1, args.jobs), devices=list(args.devices) if args.devices else None,
                            quiet=not args.verbose, retry=getattr(args, "retry", False), args=args)
    runner = make_launcher(args.launcher, options)
    runner.keep_alive = True
    runner.start()
    return runner


def sweep_main(module: Any, name: str, argv: Optional[Sequence[str]], trainer: Optional[str],
               evaluate: bool) -> int:
    """A driver's ``main``: plan, record the manifest ``<name>_{train,eval}``, run; 2 on bad input. A training
    command with ``--then-eval`` then evaluates what it trained (both plans resolved before anything runs; one
    launcher, so one set of workers, for both phases)."""
    timings = CommandTimings()
    try:
        args = parse_driver_args(module, argv, trainer, evaluate)
        eval_args = parse_driver_args(module, argv, trainer, True, then_eval=True) if args.then_eval else None
        runner = start_launcher(args)  # the workers import while the command line is checked
        try:
            spec = getattr(module, "__spec__", None)
            importable = spec is not None and sys.modules.get(spec.name) is module  # a worker imports it by name
            ran, phases = in_worker(runner, "plan_phases_of", spec.name, args, eval_args, evaluate) if importable \
                else (False, None)
            if not ran:
                phases = plan_phases(module, args, eval_args, evaluate)
            timings.mark("planned")
            codes = [drive(a, j, ev, f"{name}_eval" if ev else f"{name}_train", runner, timings)
                     for ev, a, j in phases]  # in order: training, then evaluation
        finally:
            if runner is not None:
                runner.close()
        timings.mark("ended")
        summary = timings.summary()
        if summary:
            print(summary)
        if args.timings:
            timings.write(args.timings)
        return max(codes)
    except SystemExit as err:  # bad input, or a launcher that refused the plan (e.g. sbatch): one line
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            return 2
        raise
