"""Restartable sweeps: a list of ``train.py`` jobs, skipped when their ``done`` marker exists.

Launchers (DomainBed style): ``subprocess`` (one ``python train.py`` per job, the default), ``inprocess``
(jobs run inside this process, which saves the ~5 s of imports per job that tiny CPU runs would otherwise pay)
and ``--jobs N`` worker processes (each runs jobs in-process; ``--devices 0,1`` pins each worker to one GPU
through ``CUDA_VISIBLE_DEVICES``). A failing job never stops the sweep; failures are listed at the end and the
exit code is non-zero. Every sweep writes a manifest (``<output_root>/sweeps/<name>.json``) naming all
planned run directories, so collectors can report missing runs by name.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

COOP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if COOP_DIR not in sys.path:
    sys.path.insert(0, COOP_DIR)

from dassl.utils.tools import atomic_write_json, read_json  # noqa: E402


@dataclass
class Job:
    """One ``train.py`` invocation and how collectors should label it."""

    name: str
    output_dir: str
    argv: list[str]
    labels: dict[str, Any] = field(default_factory=dict)

    def done(self) -> bool:
        return os.path.isfile(os.path.join(self.output_dir, "done"))

    def command(self) -> list[str]:
        return [sys.executable, "train.py", *self.argv]


def quote(argv: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def write_manifest(output_root: str, sweep_name: str, jobs: list[Job]) -> str:
    path = os.path.join(output_root, "sweeps", f"{sweep_name}.json")
    existing = read_json(path)["jobs"] if os.path.isfile(path) else []
    seen = {j["output_dir"] for j in existing}
    merged = existing + [asdict(j) for j in jobs if j.output_dir not in seen]
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


def _run_inprocess(job: Job, quiet: bool) -> tuple[bool, str]:
    import contextlib
    import io

    import train
    from dassl.utils.errors import UserError
    from dassl.utils.logger import restore_stdout

    sink = io.StringIO()
    if quiet:
        os.environ["CROFT_NO_PROGRESS"] = "1"
    try:
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            train.main(job.argv)
        return True, ""
    except UserError as err:
        return False, f"error: {err}"
    except Exception as err:  # a failing job must not stop the sweep
        return False, f"{type(err).__name__}: {err}"
    finally:
        restore_stdout()


def _run_subprocess(job: Job, quiet: bool, env: Optional[dict[str, str]] = None) -> tuple[bool, str]:
    os.makedirs(os.path.dirname(os.path.abspath(job.output_dir)), exist_ok=True)
    env = dict(env if env is not None else os.environ)
    if quiet:
        env["CROFT_NO_PROGRESS"] = "1"
    res = subprocess.run(job.command(), cwd=COOP_DIR, env=env, text=True,
                         stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE)
    if not quiet and res.stderr:
        sys.stderr.write(res.stderr)
    if res.returncode == 0:
        return True, ""
    tail = [ln for ln in res.stderr.strip().splitlines() if ln.strip()][-1:] if res.stderr else []
    return False, f"exit code {res.returncode}" + (f": {tail[0]}" if tail else "")


def _worker(args: tuple[Job, bool, Optional[str], int]) -> tuple[str, bool, str, float]:
    job, quiet, device, threads = args
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    import torch

    torch.set_num_threads(max(1, threads))
    t0 = time.time()
    ok, msg = _run_inprocess(job, quiet)
    return job.name, ok, msg, time.time() - t0


def run_jobs(jobs: list[Job], launcher: str = "subprocess", num_workers: int = 1,
             devices: Optional[Sequence[str]] = None, dry_run: bool = False, quiet: bool = True) -> int:
    """Run the unfinished jobs; return the number of failures."""
    todo = [j for j in jobs if not j.done()]
    print(f"{len(jobs)} runs planned, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    if dry_run:
        for j in jobs:
            print(("[done] " if j.done() else "[todo] ") + j.name)
            print("    python train.py " + quote(j.argv))
        return 0
    if not todo:
        return 0
    failures: list[tuple[str, str]] = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(todo), desc="runs", unit="run", file=sys.stderr) if tqdm else None

    def report(name: str, ok: bool, msg: str) -> None:
        if not ok:
            failures.append((name, msg))
            print(f"FAILED {name}: {msg}", file=sys.stderr)
        if bar is not None:
            bar.update(1)

    if num_workers > 1:
        devs = list(devices) if devices else [None]
        threads = max(1, (os.cpu_count() or 1) // num_workers)
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        tasks = [(j, quiet, devs[i % len(devs)], threads) for i, j in enumerate(todo)]
        with ctx.Pool(num_workers, maxtasksperchild=None) as pool:
            for name, ok, msg, _ in pool.imap_unordered(_worker, tasks):
                report(name, ok, msg)
    else:
        for j in todo:
            if launcher == "inprocess":
                ok, msg = _run_inprocess(j, quiet)
            else:
                env = dict(os.environ)
                if devices:
                    env["CUDA_VISIBLE_DEVICES"] = devices[0]
                ok, msg = _run_subprocess(j, quiet, env)
            report(j.name, ok, msg)
    if bar is not None:
        bar.close()
    if failures:
        print(f"{len(failures)} of {len(todo)} runs failed:")
        for name, msg in failures:
            print(f"  {name}: {msg}")
    else:
        print(f"all {len(todo)} runs finished")
    return len(failures)


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
    if not args.dry_run:
        write_manifest(args.eval_root if evaluate else args.output_root, manifest_name, jobs)
    todo = jobs if args.dry_run else runnable(jobs, evaluate)  # a dry run lists every planned job
    failures = run_jobs(todo, launcher=args.launcher, num_workers=args.jobs,
                        devices=args.devices, dry_run=args.dry_run, quiet=not args.verbose)
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
    os.chdir(COOP_DIR)
    args.root = os.path.abspath(os.path.expanduser(args.root))
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


def add_launcher_args(p: Any) -> None:
    """The launcher flags every driver shares (how runs are executed, not what they compute)."""
    p.add_argument("--launcher", choices=["subprocess", "inprocess"], default="subprocess")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (each runs jobs in-process)")
    p.add_argument("--devices", nargs="+", help="GPU ids assigned round-robin to workers")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--verbose", action="store_true", help="show each run's log on the console")
    p.epilog = "Extra yacs overrides for every run go after '--', e.g. -- OPTIM.MAX_EPOCH 5 DEVICE cuda"
