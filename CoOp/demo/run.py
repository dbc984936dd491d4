"""``python -m demo`` (``make demo``): the whole Setup-II protocol in miniature, on real packaged data, with a
tiny CLIP trained for it.

1. Build DigitsDG-mini (4 handwriting domains in the PACS layout) + Fashion-MNIST / texture open-set folders.
2. Install the tiny CLIP ``tinyclip-rn32`` shipped in ``demo/weights/`` (``--pretrain``: pretrain it here with
   the same deterministic recipe instead; its bytes then depend on the CPU).
3. Leave-one-domain-out training for every method of :mod:`demo.methods` through the real Setup-II drivers.
4. Open-set evaluation against both open-set folders with every score; :mod:`demo.report` prints the tables,
   effect sizes, verdict, figures (``--readme`` writes them into docs/demo.md between the demo markers,
   ``--headline`` the headline into the README between the headline markers).

Everything lands in ``<cache>/demo`` (default ``<repo>/.cache``); a second run finds every ``done`` marker and
only re-prints. ``--quick`` (1 seed, 1 held-out domain, 3 epochs) is the CI smoke version. The last line gives
the wall-clock seconds of each stage.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from demo import methods as M
from demo.pretrain.model import REPO_DIR
from demo.timing import Stages

DEFAULT_SEEDS = (1, 2, 3, 4, 5)  # 4 held-out domains x 5 seeds = 20 pairs behind every effect and the verdict
DEFAULT_EPOCHS = 10  # with the feature cache (the demo configs, and --full, say 30)
FULL_EPOCHS = 30
# the data stage checks every file against its sha256 manifest, and the report draws its own figures: the runs
# skip their start-up image decode and their per-run energy histogram (neither changes a number)
RUN_OPTS = ("DATASET.VERIFY_IMAGES", "False", "TEST.SAVE_PLOTS", "False")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo",
                                description="Run the Setup-II protocol on DigitsDG-mini with a tiny CLIP")
    p.add_argument("--cache", default=str(REPO_DIR / ".cache"), help="cache folder (data, CLIP, runs)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    p.add_argument("--domains", nargs="+", help="held-out domains (default: all four)")
    p.add_argument("--methods", nargs="+", help="subset of method labels or trainers, e.g. CoOp CRoFT")
    p.add_argument("--epochs", type=int,
                   help=f"training epochs of every method (default {DEFAULT_EPOCHS}; --quick 3, --full {FULL_EPOCHS})")
    p.add_argument("--per-class", type=int, help="DigitsDG-mini images per domain and class (builder default)")
    p.add_argument("--pretrain", action="store_true",
                   help="pretrain the tiny CLIP here (deterministic recipe, CPU-dependent bytes) instead of installing "
                        "the shipped weights")
    p.add_argument("--pretrain-steps", type=int, help="tiny-CLIP pretraining steps (implies --pretrain; default: "
                                                      "the Recipe's)")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="parallel workers")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 held-out domain, 3 epochs (smoke test)")
    p.add_argument("--full", action="store_true",
                   help="the stronger variant (make demo-full): 30 epochs, CoCoOp, CRoFT over the official λ2 grid")
    p.add_argument("--rerun-changed", action="store_true",
                   help="replace the runs of another configuration in the cache folder (default: refuse them)")
    p.add_argument("--select", choices=["val", "oracle", "none"], default="val",
                   help="how a swept method's setting is chosen per held-out domain and seed (default %(default)s)")
    p.add_argument("--readme", help="write the report between the demo markers of this file (make demo-readme: "
                                    "docs/demo.md)")
    p.add_argument("--headline", help="write the headline (table, figure, verdict) between the headline markers of "
                                      "this file (make demo-readme: README.md)")
    p.add_argument("--figures", help="folder for the PNGs (default <cache>/demo/figures); README links are relative")
    return p


def ensure_data(root: str, per_class: Optional[int]) -> None:
    from demo.data import SourceMissingError, build

    print("== 1/4 DigitsDG-mini and open-set folders")
    try:
        build(root, **({"per_class": per_class} if per_class else {}))
    except SourceMissingError as e:
        raise SystemExit(f"error: {e}") from None


def ensure_backbone(cache: str, data_root: str, pretrain: bool, steps: Optional[int]) -> tuple[str, dict]:
    """(float32 weights file for the runs, tiny-CLIP summary): the shipped weights (``<cache>/tinyclip``), or
    ``pretrain`` them here (``<cache>/tinyclip-pretrained``)."""
    from demo.data import SourceMissingError as DataMissingError
    from demo.pretrain import CKPT_NAME, SourceMissingError

    tiny_dir = os.path.join(cache, "tinyclip-pretrained" if pretrain or steps else "tinyclip")
    try:
        if pretrain or steps:
            from demo.pretrain import pretrain as run_pretraining

            print("== 2/4 tiny CLIP (tinyclip-rn32): pretraining here")
            summary = run_pretraining(tiny_dir, data_root=data_root, npm_dir=os.path.join(cache, "npm"),
                                      **({"steps": steps} if steps else {}))
        else:
            from demo.pretrain import SHIPPED_DIR, use_shipped

            print(f"== 2/4 tiny CLIP (tinyclip-rn32): the shipped weights ({SHIPPED_DIR})")
            summary = use_shipped(tiny_dir)
    except (FileNotFoundError, SourceMissingError, DataMissingError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"tiny CLIP weights sha256 {summary['sha256']}")
    zs = summary.get("zero_shot", {}).get("accuracy")
    if zs:
        print("zero-shot accuracy per domain (%): " + ", ".join(f"{d} {v:.1f}" for d, v in zs.items()))
    return os.path.join(tiny_dir, CKPT_NAME), summary


def check_weights(demo_root: str, sha256: str) -> None:
    """Runs of one cache folder belong to one tiny CLIP (its weights are not part of a run's fingerprint):
    ``<demo_root>/tinyclip.json`` names it; other weights are one clear error."""
    from dassl.utils.tools import atomic_write_json, read_json

    path = os.path.join(demo_root, "tinyclip.json")
    if os.path.isfile(path):
        held = read_json(path).get("sha256")
        if held != sha256:
            raise SystemExit(f"error: {demo_root} holds runs of the tiny CLIP sha256 {held}, this run uses {sha256} "
                             "(--pretrain or not, or other CPU kernels): pass another --cache, or make clean-demo")
        return
    os.makedirs(demo_root, exist_ok=True)
    atomic_write_json(path, {"sha256": sha256})


def plan_all(args: argparse.Namespace, data_root: str, weights: str, roots: tuple[str, str], evaluate: bool,
             planner: Any = None) -> list:
    """Setup-II jobs of every selected method (training, or open-set evaluation), each run with its planned
    fingerprint (a directory holding a run of another configuration is not done; ``planner``: a
    ``launch.runid.Planner`` shared by calls, whose configs are memoised). Evaluations of the models with local
    features also score GL-MCM (``TEST.OOD_SCORES``: a scoring key, so the model they name is the trained run,
    ``launch.runid.evaluated_model``). Training starts with the
    methods that train on local features (LoCoOp): their runs fill each feature-cache entry with its local
    features in the same encoder pass, where a plain run first would leave them to a second pass."""
    from launch import setup2
    from launch.sweep import resolve_plan

    jobs = []
    methods = M.select(args.methods, args.full)
    for m in methods if evaluate else sorted(methods, key=lambda m: not m.train_local):
        argv = ["--root", data_root, "--trainer", m.trainer, "--method", m.label, "--datasets", "DigitsDG",
                "--cfgs", m.cfg, "--seeds", *map(str, args.seeds), "--shots", "16", "--weights", weights,
                "--output-root", roots[0], "--eval-root", roots[1], "--ood", *M.OOD_SETS, "--device", "cpu",
                *m.flags, *(["--domains", *args.domains] if args.domains else []),
                *(["--epochs", str(args.epochs)] if args.epochs else []),
                "--", "FEATURE_CACHE.DIR", os.path.join(args.cache, "features"), *RUN_OPTS,
                *(["TEST.OOD_SCORES", str(M.local_scores())] if evaluate and m.local else [])]
        driver_args, planned = setup2.plan(argv, evaluate=evaluate)
        planner = resolve_plan(setup2, driver_args, planned, evaluate, planner)
        jobs.extend(planned)
    return jobs


def run_all(args: argparse.Namespace, data_root: str, weights: str, roots: tuple[str, str], stages: Stages,
            runner: Any) -> int:
    """Train, then evaluate every runnable job with the pool ``runner``; returns the number of failed runs."""
    from launch.runid import Planner
    from launch.sweep import mark_replacements, run_jobs, runnable, write_manifest

    with stages.stage("training"):
        print("== 3/4 leave-one-domain-out training")
        planner = Planner()
        train = plan_all(args, data_root, weights, roots, evaluate=False, planner=planner)
        evals = plan_all(args, data_root, weights, roots, evaluate=True, planner=planner)
        for jobs in (train, evals):  # a directory of another run stops the demo before anything runs
            mark_replacements(jobs, args.rerun_changed)
        write_manifest(roots[0], "demo_train", train)
        note_machine(os.path.dirname(roots[0]), train)
        ran = [j for j in train if not j.done()]
        failures = run_jobs(train, num_workers=args.jobs, runner=runner)
    stages.note("training", f"{encoder_passes(ran):,} encoder passes filling the feature cache")
    with stages.stage("evaluation"):
        print("== 4/4 open-set evaluation")
        # planned again now that the models exist: an evaluation names the trained model (runid.evaluated_model)
        evals = plan_all(args, data_root, weights, roots, evaluate=True, planner=planner)
        mark_replacements(evals, args.rerun_changed)
        write_manifest(roots[1], "demo_eval", evals)
        evals = runnable(evals, True)
        note_machine(os.path.dirname(roots[0]), evals)
        ran = [j for j in evals if not j.done()]
        failures += run_jobs(evals, num_workers=args.jobs, runner=runner)
    stages.note("evaluation", f"{encoder_passes(ran):,}")
    return failures


def one_thread_workers(jobs: int) -> Any:
    """The ``workers`` launcher kept alive across training and evaluation (one start-up, begun before the data
    stage so that the workers import while it runs), every job on one torch thread: the numbers then do not
    depend on which job happened to run alone at the end."""
    from launch.launchers import LaunchOptions
    from launch.workers import WorkerLauncher

    class OneThreadWorkers(WorkerLauncher):
        keep_alive = True

        @staticmethod
        def _threads(workers: list, pending: int) -> int:
            return 1

    return OneThreadWorkers(LaunchOptions(jobs=max(1, jobs), quiet=True))


MACHINES = "machines.json"


def note_machine(demo_root: str, jobs: list) -> None:
    """Add this CPU and its float kernels to ``<demo_root>/machines.json`` when it is about to run some of
    ``jobs`` (the report names the machines that computed its rows)."""
    from dassl.utils.tools import atomic_write_json, read_json
    from demo.pretrain.run import cpu_kernels

    if all(j.done() for j in jobs):
        return
    path = os.path.join(demo_root, MACHINES)
    seen = read_json(path) if os.path.isfile(path) else []
    here = cpu_kernels()
    if here not in seen:
        atomic_write_json(path, seen + [here])


def machines_text(demo_root: str) -> str:
    """"AMD EPYC (torch CPU capability AVX512)" for each machine that computed runs of this cache."""
    from dassl.utils.tools import read_json

    path = os.path.join(demo_root, MACHINES)
    seen = read_json(path) if os.path.isfile(path) else []
    return "; ".join(f"{m['cpu']} (torch CPU capability {m['aten_capability']}"
                     + "".join(f", {k}={m[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if m.get(k))
                     + ")" for m in seen) or "unknown"


def encoder_passes(jobs: list) -> int:
    """Images the runs of ``jobs`` passed through the image encoder (feature-cache fills; from their records)."""
    from dassl.utils.tools import read_json

    total = 0
    for d in (d for j in jobs for d in j.run_dirs()):
        path = os.path.join(d, "record.json")
        if os.path.isfile(path):
            total += int(read_json(path).get("timings", {}).get("encoder_images", 0))
    return total


def header(args: argparse.Namespace, tiny: dict, demo_root: str) -> str:
    """What was run, on which CPU, and the tiny CLIP it ran on (sha256, recipe, zero-shot table)."""
    methods = ", ".join(m.label + (" (λ2 grid " + "/".join(m.flags[m.flags.index("--lambda2") + 1:
                                                                   m.flags.index("--ratios")]) + ")"
                                   if "--lambda2" in m.flags else "") for m in M.select(args.methods, args.full))
    zs, recipe = tiny.get("zero_shot", {}), tiny.get("recipe") or {}
    source = "the shipped weights" if tiny.get("source") == "shipped" else "pretrained here"
    lines = [f"Generated by `python -m demo {' '.join(args.argv)}` (from `CoOp/`). "
             f"Setup-II on DigitsDG-mini: leave-one-domain-out over {', '.join(args.domains or ['all 4 domains'])}, "
             f"seeds {', '.join(map(str, args.seeds))}, 16 shots, "
             f"{args.epochs} epochs; open sets {', '.join(M.OOD_SETS)}. Methods: {methods}. "
             f"Rows computed on: {machines_text(demo_root)}, one torch thread per run.",
             "", f"Tiny CLIP `tinyclip-rn32` ({source}): sha256 `{tiny.get('sha256', '?')}`, "
                 f"recipe `{dict(sorted(recipe.items()))}`.", ""]
    if zs:
        lines += ["| domain | zero-shot accuracy % |", "|---|---|"]
        lines += [f"| {d} | {v:.2f} |" for d, v in sorted(zs.get("accuracy", {}).items())] + [""]
    return "\n".join(lines)


def report(args: argparse.Namespace, demo_root: str, roots: tuple[str, str], tiny: dict) -> str:
    """Collector CSVs plus the demo report (tables, figures, verdict); writes the docs section and the headline
    when asked; returns the Markdown section."""
    from demo import report as rep
    from launch import collect

    collect.collect_oodg(roots[0], os.path.join(demo_root, "setup2_oodg.csv"))
    collect.collect_oodd(roots[1], os.path.join(demo_root, "setup2_oodd.csv"),
                         ["energy", "mcm", "msp", "knn", "gl_mcm"], "fpr95_tpr_id")
    fig_dir = os.path.abspath(args.figures or os.path.join(demo_root, "figures"))
    ref_base = os.path.dirname(os.path.abspath(args.readme)) if args.readme else demo_root
    head_base = os.path.dirname(os.path.abspath(args.headline)) if args.headline else demo_root
    text, headline = rep.build(demo_root, fig_dir, os.path.relpath(fig_dir, ref_base), args.select,
                               header(args, tiny, demo_root), os.path.relpath(fig_dir, head_base))
    print("\n## DigitsDG-mini, Setup-II protocol (tiny CLIP)\n")
    print(text)
    if args.readme:
        rep.write_between_markers(args.readme, text)
        print(f"demo section and figures written: {args.readme}, {fig_dir}")
    if args.headline:
        rep.write_between_markers(args.headline, headline, rep.HEADLINE)
        print(f"headline written: {args.headline}")
    return text


def resolve(args: argparse.Namespace) -> None:
    """Fill the variant-dependent defaults (``--quick``, ``--full``) and refuse unusable output files early."""
    from demo import report as rep

    if args.quick:
        args.seeds, args.domains = args.seeds[:1], args.domains or ["mnist"]
    args.epochs = args.epochs or (3 if args.quick else FULL_EPOCHS if args.full else DEFAULT_EPOCHS)
    for flag, path, markers in (("--readme", args.readme, rep.SECTION), ("--headline", args.headline, rep.HEADLINE)):
        if path:
            rep.check_markers(path, markers, flag)
    M.select(args.methods, args.full)
    args.cache = os.path.abspath(args.cache)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    resolve(args)
    stages = Stages()
    data_root = os.path.join(args.cache, "data")
    demo_root = os.path.join(args.cache, "demo-quick" if args.quick else "demo-full" if args.full else "demo")
    roots = (os.path.join(demo_root, "output"), os.path.join(demo_root, "eval_open_ood"))
    runner = one_thread_workers(args.jobs)
    try:
        runner.start()
        with stages.stage("data"):
            ensure_data(data_root, args.per_class)
        with stages.stage("tiny CLIP"):
            weights, tiny = ensure_backbone(args.cache, data_root, args.pretrain, args.pretrain_steps)
            check_weights(demo_root, tiny["sha256"])
        failures = run_all(args, data_root, weights, roots, stages, runner)
    finally:
        runner.close()
    with stages.stage("report"):
        report(args, demo_root, roots, tiny)
    print(f"\ndemo finished ({'with' if failures else 'no'} failed runs)")
    print(stages.line())
    return 1 if failures else 0
