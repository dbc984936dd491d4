"""``python -m demo`` (``make demo``): the whole Setup-II protocol in miniature, on real packaged data, with a
CLIP trained here.

1. Build DigitsDG-mini (4 handwriting domains in the PACS layout) + Fashion-MNIST / texture open-set folders.
2. Pretrain the tiny CLIP ``tinyclip-rn32`` deterministically (or reuse the cached, checksum-verified one).
3. Leave-one-domain-out training for every method of :mod:`demo.methods` through the real Setup-II drivers.
4. Open-set evaluation against both open-set folders with every score; :mod:`demo.report` prints the tables,
   paired tests, figures and summary (``--readme`` writes them into the README between the demo markers).

Everything lands in ``<cache>/demo`` (default ``<repo>/.cache``); a second run finds every ``done`` marker and
only re-prints. ``--quick`` (1 seed, 1 held-out domain, 3 epochs) is the CI smoke version.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from demo import methods as M
from demo.pretrain.model import REPO_DIR


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo",
                                description="Run the Setup-II protocol on DigitsDG-mini with a tiny CLIP")
    p.add_argument("--cache", default=str(REPO_DIR / ".cache"), help="cache folder (data, CLIP, runs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--domains", nargs="+", help="held-out domains (default: all four)")
    p.add_argument("--methods", nargs="+", help="subset of method labels or trainers, e.g. CoOp CRoFT")
    p.add_argument("--epochs", type=int, help="override the demo configs' epochs")
    p.add_argument("--per-class", type=int, help="DigitsDG-mini images per domain and class (builder default)")
    p.add_argument("--pretrain-steps", type=int, help="tiny-CLIP pretraining steps (default: the Recipe's)")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="parallel workers")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 held-out domain, 3 epochs (smoke test)")
    p.add_argument("--full", action="store_true",
                   help="the stronger variant (make demo-full): seeds 1-5, CoCoOp, CRoFT over the official λ2 grid")
    p.add_argument("--select", choices=["val", "oracle", "none"], default="val",
                   help="how a swept method's setting is chosen per held-out domain and seed (default %(default)s)")
    p.add_argument("--readme", help="write the report between the demo markers of this README (make demo-readme)")
    p.add_argument("--figures", help="folder for the PNGs (default <cache>/demo/figures); README links are relative")
    return p


def ensure_data(root: str, per_class: Optional[int]) -> None:
    from demo.data import build

    print("== 1/4 DigitsDG-mini and open-set folders")
    build(root, **({"per_class": per_class} if per_class else {}))


def ensure_backbone(cache: str, data_root: str, steps: Optional[int]) -> tuple[str, dict]:
    from demo.pretrain import CKPT_NAME, pretrain

    print("== 2/4 tiny CLIP (tinyclip-rn32)")
    tiny_dir = os.path.join(cache, "tinyclip")
    summary = pretrain(tiny_dir, data_root=data_root, npm_dir=os.path.join(cache, "npm"),
                       **({"steps": steps} if steps else {}))
    print(f"tiny CLIP weights sha256 {summary['sha256']}")
    zs = summary.get("zero_shot", {}).get("accuracy")
    if zs:
        print("zero-shot accuracy per domain (%): " + ", ".join(f"{d} {v:.1f}" for d, v in zs.items()))
    return os.path.join(tiny_dir, CKPT_NAME), summary


def plan_all(args: argparse.Namespace, data_root: str, weights: str, roots: tuple[str, str], evaluate: bool) -> list:
    """Setup-II jobs of every selected method (training, or open-set evaluation)."""
    from launch import setup2

    jobs = []
    for m in M.select(args.methods, args.full):
        argv = ["--root", data_root, "--trainer", m.trainer, "--method", m.label, "--datasets", "DigitsDG",
                "--cfgs", m.cfg, "--seeds", *map(str, args.seeds), "--shots", "16", "--weights", weights,
                "--output-root", roots[0], "--eval-root", roots[1], "--ood", *M.OOD_SETS, "--device", "cpu",
                *m.flags, *(["--domains", *args.domains] if args.domains else []),
                *(["--epochs", str(args.epochs)] if args.epochs else []),
                "--", "FEATURE_CACHE.DIR", os.path.join(args.cache, "features")]
        jobs.extend(setup2.plan(argv, evaluate=evaluate)[1])
    return jobs


def run_all(args: argparse.Namespace, data_root: str, weights: str, roots: tuple[str, str]) -> int:
    """Train, then evaluate every runnable job; returns the number of failed runs."""
    from launch.sweep import run_jobs, runnable, write_manifest

    print("== 3/4 leave-one-domain-out training")
    train = plan_all(args, data_root, weights, roots, evaluate=False)
    write_manifest(roots[0], "demo_train", train)
    failures = run_jobs(train, num_workers=args.jobs)
    print("== 4/4 open-set evaluation")
    evals = plan_all(args, data_root, weights, roots, evaluate=True)
    write_manifest(roots[1], "demo_eval", evals)
    return failures + run_jobs(runnable(evals, True), num_workers=args.jobs)


def header(args: argparse.Namespace, tiny: dict) -> str:
    """What was run, and the tiny CLIP it ran on (sha256, recipe, zero-shot table)."""
    methods = ", ".join(m.label + (" (λ2 grid " + "/".join(m.flags[m.flags.index("--lambda2") + 1:
                                                                   m.flags.index("--ratios")]) + ")"
                                   if "--lambda2" in m.flags else "") for m in M.select(args.methods, args.full))
    zs, recipe = tiny.get("zero_shot", {}), tiny.get("recipe") or {}
    lines = [f"Generated by `python -m demo {' '.join(args.argv)}` (from `CoOp/`). "
             f"Setup-II on DigitsDG-mini: leave-one-domain-out over {', '.join(args.domains or ['all 4 domains'])}, "
             f"seeds {', '.join(map(str, args.seeds))}, 16 shots, "
             f"{args.epochs or 30} epochs; open sets {', '.join(M.OOD_SETS)}. Methods: {methods}.",
             "", f"Tiny CLIP `tinyclip-rn32`: sha256 `{tiny.get('sha256', '?')}`, "
                 f"recipe `{dict(sorted(recipe.items()))}`.", ""]
    if zs:
        lines += ["| domain | zero-shot accuracy % |", "|---|---|"]
        lines += [f"| {d} | {v:.2f} |" for d, v in sorted(zs.get("accuracy", {}).items())] + [""]
    return "\n".join(lines)


def report(args: argparse.Namespace, demo_root: str, roots: tuple[str, str], tiny: dict) -> str:
    """Collector CSVs plus the demo report (tables, figures, summary); returns the Markdown."""
    from demo import report as rep
    from launch import collect

    collect.collect_oodg(roots[0], os.path.join(demo_root, "setup2_oodg.csv"))
    collect.collect_oodd(roots[1], os.path.join(demo_root, "setup2_oodd.csv"), ["energy", "mcm", "msp", "knn"],
                         "fpr95_tpr_id")
    fig_dir = os.path.abspath(args.figures or os.path.join(demo_root, "figures"))
    ref_base = os.path.dirname(os.path.abspath(args.readme)) if args.readme else demo_root
    text = rep.build(demo_root, fig_dir, os.path.relpath(fig_dir, ref_base), args.select, header(args, tiny))
    print("\n## DigitsDG-mini, Setup-II protocol (tiny CLIP)\n")
    print(text)
    if args.readme:
        rep.write_between_markers(args.readme, text)
        print(f"README tables and figures written: {args.readme}, {fig_dir}")
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    if args.quick:
        args.seeds, args.domains, args.epochs = args.seeds[:1], args.domains or ["mnist"], args.epochs or 3
    elif args.full and args.seeds == [1, 2, 3]:
        args.seeds = [1, 2, 3, 4, 5]
    if args.readme and not os.path.isfile(args.readme):
        raise SystemExit(f"error: --readme {args.readme}: no such file")
    M.select(args.methods, args.full)
    t0 = time.time()
    args.cache = os.path.abspath(args.cache)
    data_root = os.path.join(args.cache, "data")
    demo_root = os.path.join(args.cache, "demo-quick" if args.quick else "demo-full" if args.full else "demo")
    roots = (os.path.join(demo_root, "output"), os.path.join(demo_root, "eval_open_ood"))
    ensure_data(data_root, args.per_class)
    weights, tiny = ensure_backbone(args.cache, data_root, args.pretrain_steps)
    failures = run_all(args, data_root, weights, roots)
    report(args, demo_root, roots, tiny)
    print(f"\ndemo finished in {time.time() - t0:.0f} s ({'with' if failures else 'no'} failed runs)")
    return 1 if failures else 0
