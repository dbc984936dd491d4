"""``make demo``: the whole Setup-II protocol in miniature, on real packaged data, with a CLIP trained here.

1. Build DigitsDG-mini (4 handwriting domains in the PACS layout) + Fashion-MNIST / texture open-set folders.
2. Pretrain the tiny CLIP ``tinyclip-rn32`` (or reuse the cached, checksum-verified one).
3. Leave-one-domain-out training (16 shots, seeds 1-3) for ZS-CLIP, CoOp, CLIP-Adapter, Tip-Adapter-F,
   CRoFT (official behaviour) and CRoFT with every named fix, through the real Setup-II drivers.
4. Open-set evaluation against both open-set folders, then the collectors print the tables (and write CSV);
   one energy-distribution PNG per method is copied next to them.

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

COOP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(COOP_DIR)
for p in (COOP_DIR, os.path.join(COOP_DIR, "tools")):
    if p not in sys.path:
        sys.path.insert(0, p)

# (method label, trainer, config, extra driver flags)
METHODS = [
    ("ZS-CLIP", "ZeroshotCLIP", "demo_digits", []),
    ("CoOp", "CoOp", "demo_digits", []),
    ("CLIP-Adapter", "CLIP_Adapter", "demo_digits", []),
    ("Tip-Adapter-F", "TIP_ADAPTER", "demo_digits", []),
    ("CRoFT", "CRoFT", "demo_digits", ["--lambda1", "15", "--lambda2", "10", "--ratios", "0.2,0.5", "--gen-step", "1"]),
    ("CRoFT (fixed)", "CRoFT", "demo_digits_fixed", ["--lambda1", "15", "--lambda2", "10", "--ratios", "0.2,0.5",
                                                     "--gen-step", "1"]),
]
OOD_SETS = ["FashionMNIST", "Textures"]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the Setup-II protocol on DigitsDG-mini with a tiny CLIP")
    p.add_argument("--cache", default=os.path.join(REPO_DIR, ".cache"), help="cache folder (data, CLIP, runs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--domains", nargs="+", help="held-out domains (default: all four)")
    p.add_argument("--methods", nargs="+", help="subset of method labels, e.g. CoOp CRoFT")
    p.add_argument("--epochs", type=int, help="override the demo configs' epochs")
    p.add_argument("--per-class", type=int, help="DigitsDG-mini images per domain and class (builder default)")
    p.add_argument("--pretrain-seconds", type=float, default=150.0, help="tiny-CLIP pretraining budget")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="parallel workers")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 held-out domain, 3 epochs (smoke test)")
    return p


def ensure_data(root: str, per_class: Optional[int]) -> None:
    import build_digitsdg_mini as bdm

    kwargs = {"per_class": per_class} if per_class else {}
    print("== 1/4 DigitsDG-mini and open-set folders")
    bdm.build(root, **kwargs)


def ensure_backbone(cache_dir: str, data_root: str, seconds: float) -> str:
    import pretrain_tiny_clip as ptc

    print("== 2/4 tiny CLIP (tinyclip-rn32)")
    npm_dir = os.path.join(os.path.dirname(cache_dir), "npm")
    summary = ptc.pretrain(cache_dir, data_root=data_root, max_seconds=seconds, npm_dir=npm_dir)
    zs = summary.get("zero_shot", {}).get("accuracy")
    if zs:
        print("zero-shot accuracy per domain (%): " + ", ".join(f"{d} {v:.1f}" for d, v in zs.items()))
    return os.path.join(cache_dir, "tinyclip-rn32.pt")


def plan_all(args: argparse.Namespace, data_root: str, weights: str, out_root: str, eval_root: str,
             evaluate: bool) -> list:
    from launch import setup2

    jobs = []
    for label, trainer, cfg, flags in METHODS:
        if args.methods and label not in args.methods and trainer not in args.methods:
            continue
        argv = ["--root", data_root, "--trainer", trainer, "--method", label, "--datasets", "DigitsDG",
                "--cfgs", cfg, "--seeds", *map(str, args.seeds), "--shots", "16", "--weights", weights,
                "--output-root", out_root, "--eval-root", eval_root, "--ood", *OOD_SETS, "--device", "cpu", *flags]
        if args.domains:
            argv += ["--domains", *args.domains]
        if args.epochs:
            argv += ["--epochs", str(args.epochs)]
        argv += ["--", "FEATURE_CACHE.DIR", os.path.join(args.cache, "features")]
        _, planned = setup2.plan(argv, evaluate=evaluate)
        jobs.extend(planned)
    return jobs


def copy_energy_plots(eval_root: str, dest: str) -> list[str]:
    """One energy-histogram PNG per method (seed 1, first held-out domain, Fashion-MNIST as open-set)."""
    from launch.sweep import read_manifests

    written, seen = [], set()
    for job in read_manifests(eval_root):
        lab = job["labels"]
        key = lab.get("method")
        png = os.path.join(job["output_dir"], "energy_hist.png")
        if key in seen or lab.get("ood") != OOD_SETS[0] or not os.path.isfile(png):
            continue
        seen.add(key)
        target = os.path.join(dest, "energy_" + "".join(c if c.isalnum() else "_" for c in key) + ".png")
        shutil.copyfile(png, target)
        written.append(target)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    from launch import collect
    from launch.sweep import run_jobs, runnable, write_manifest

    args = get_parser().parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.domains = args.domains or ["mnist"]
        args.epochs = args.epochs or 3
    t0 = time.time()
    cache = os.path.abspath(args.cache)
    data_root = os.path.join(cache, "data")
    demo_root = os.path.join(cache, "demo" if not args.quick else "demo-quick")
    out_root, eval_root = os.path.join(demo_root, "output"), os.path.join(demo_root, "eval_open_ood")
    ensure_data(data_root, args.per_class)
    weights = ensure_backbone(os.path.join(cache, "tinyclip"), data_root, args.pretrain_seconds)
    cwd = os.getcwd()
    try:
        print("== 3/4 leave-one-domain-out training")
        train = plan_all(args, data_root, weights, out_root, eval_root, evaluate=False)
        write_manifest(out_root, "demo_train", train)
        failures = run_jobs(train, num_workers=args.jobs)
        print("== 4/4 open-set evaluation")
        evals = plan_all(args, data_root, weights, out_root, eval_root, evaluate=True)
        write_manifest(eval_root, "demo_eval", evals)
        failures += run_jobs(runnable(evals, True), num_workers=args.jobs)
    finally:
        os.chdir(cwd)
    print("\n## DigitsDG-mini, Setup-II protocol (tiny CLIP; leave-one-domain-out, 16 shots)\n")
    print(collect.collect_oodg(out_root, os.path.join(demo_root, "setup2_oodg.csv")))
    print()
    print(collect.collect_oodd(eval_root, os.path.join(demo_root, "setup2_oodd.csv"), ["energy"], "fpr95_tpr_id"))
    for png in copy_energy_plots(eval_root, demo_root):
        print(f"energy distribution plot: {png}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s ({'with' if failures else 'no'} failed runs)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
