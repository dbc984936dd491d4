"""``python -m demo`` (``make demo``): the whole Setup-II protocol in miniature, on real packaged data, with a
CLIP trained here.

1. Build DigitsDG-mini (4 handwriting domains in the PACS layout) + Fashion-MNIST / texture open-set folders.
2. Pretrain the tiny CLIP ``tinyclip-rn32`` deterministically (or reuse the cached, checksum-verified one).
3. Leave-one-domain-out training for every method of :mod:`demo.methods` through the real Setup-II drivers.
4. Open-set evaluation against both open-set folders; the collectors print the tables (and write CSV).

Everything lands in ``<cache>/demo`` (default ``<repo>/.cache``); a second run finds every ``done`` marker and
only re-prints. ``--quick`` (1 seed, 1 held-out domain, 3 epochs) is the CI smoke version.
"""
from __future__ import annotations

import argparse
import os
import shutil
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
    return p


def ensure_data(root: str, per_class: Optional[int]) -> None:
    from demo.data import build

    print("== 1/4 DigitsDG-mini and open-set folders")
    build(root, **({"per_class": per_class} if per_class else {}))


def ensure_backbone(cache: str, data_root: str, steps: Optional[int]) -> str:
    from demo.pretrain import CKPT_NAME, pretrain

    print("== 2/4 tiny CLIP (tinyclip-rn32)")
    tiny_dir = os.path.join(cache, "tinyclip")
    summary = pretrain(tiny_dir, data_root=data_root, npm_dir=os.path.join(cache, "npm"),
                       **({"steps": steps} if steps else {}))
    print(f"tiny CLIP weights sha256 {summary['sha256']}")
    zs = summary.get("zero_shot", {}).get("accuracy")
    if zs:
        print("zero-shot accuracy per domain (%): " + ", ".join(f"{d} {v:.1f}" for d, v in zs.items()))
    return os.path.join(tiny_dir, CKPT_NAME)


def plan_all(args: argparse.Namespace, data_root: str, weights: str, roots: tuple[str, str], evaluate: bool) -> list:
    """Setup-II jobs of every selected method (training, or open-set evaluation)."""
    from launch import setup2

    jobs = []
    for m in M.select(args.methods):
        argv = ["--root", data_root, "--trainer", m.trainer, "--method", m.label, "--datasets", "DigitsDG",
                "--cfgs", m.cfg, "--seeds", *map(str, args.seeds), "--shots", "16", "--weights", weights,
                "--output-root", roots[0], "--eval-root", roots[1], "--ood", *M.OOD_SETS, "--device", "cpu",
                *m.flags, *(["--domains", *args.domains] if args.domains else []),
                *(["--epochs", str(args.epochs)] if args.epochs else []),
                "--", "FEATURE_CACHE.DIR", os.path.join(args.cache, "features")]
        jobs.extend(setup2.plan(argv, evaluate=evaluate)[1])
    return jobs


def copy_energy_plots(eval_root: str, dest: str) -> list[str]:
    """One energy-histogram PNG per method (seed 1, first held-out domain, Fashion-MNIST as open-set)."""
    from launch.sweep import read_manifests

    written, seen = [], set()
    for job in read_manifests(eval_root):
        key, png = job["labels"].get("method"), os.path.join(job["output_dir"], "energy_hist.png")
        if key in seen or job["labels"].get("ood") != M.OOD_SETS[0] or not os.path.isfile(png):
            continue
        seen.add(key)
        target = os.path.join(dest, "energy_" + "".join(c if c.isalnum() else "_" for c in key) + ".png")
        shutil.copyfile(png, target)
        written.append(target)
    return written


def run_all(args: argparse.Namespace, data_root: str, weights: str, roots: tuple[str, str]) -> int:
    """Train, then evaluate every runnable job; returns the number of failed runs."""
    from launch.sweep import run_jobs, runnable, write_manifest

    cwd = os.getcwd()
    try:  # the drivers plan from CoOp/; the caller's working directory comes back afterwards
        print("== 3/4 leave-one-domain-out training")
        train = plan_all(args, data_root, weights, roots, evaluate=False)
        write_manifest(roots[0], "demo_train", train)
        failures = run_jobs(train, num_workers=args.jobs)
        print("== 4/4 open-set evaluation")
        evals = plan_all(args, data_root, weights, roots, evaluate=True)
        write_manifest(roots[1], "demo_eval", evals)
        return failures + run_jobs(runnable(evals, True), num_workers=args.jobs)
    finally:
        os.chdir(cwd)


def report(demo_root: str, roots: tuple[str, str]) -> None:
    from launch import collect

    print("\n## DigitsDG-mini, Setup-II protocol (tiny CLIP; leave-one-domain-out, 16 shots)\n")
    print(collect.collect_oodg(roots[0], os.path.join(demo_root, "setup2_oodg.csv")))
    print()
    print(collect.collect_oodd(roots[1], os.path.join(demo_root, "setup2_oodd.csv"), ["energy"], "fpr95_tpr_id"))
    for png in copy_energy_plots(roots[1], demo_root):
        print(f"energy distribution plot: {png}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    if args.quick:
        args.seeds, args.domains, args.epochs = args.seeds[:1], args.domains or ["mnist"], args.epochs or 3
    M.select(args.methods)
    t0 = time.time()
    args.cache = os.path.abspath(args.cache)
    data_root = os.path.join(args.cache, "data")
    demo_root = os.path.join(args.cache, "demo-quick" if args.quick else "demo")
    roots = (os.path.join(demo_root, "output"), os.path.join(demo_root, "eval_open_ood"))
    ensure_data(data_root, args.per_class)
    weights = ensure_backbone(args.cache, data_root, args.pretrain_steps)
    failures = run_all(args, data_root, weights, roots)
    report(demo_root, roots)
    print(f"\ndemo finished in {time.time() - t0:.0f} s ({'with' if failures else 'no'} failed runs)")
    return 1 if failures else 0
