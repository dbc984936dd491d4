"""Setup-I sweeps: ImageNet with 40 % of the classes in-distribution (``imagenet46``), ViT-B/16.

Training runs:   output/<TRAINER>/imagenet46_<CFG>[_<swept values>]/seed<S>/shots<K>/
Evaluation runs: eval_setup1/<TRAINER>/imagenetood46_<CFG>[_<swept values>]/shots<K>/<TEST_OOD>/seed<S>/

What runs comes from :mod:`launch.official`: seeds 1-3; shots 1, 16 and 32 (CLIP-Adapter: 4); every official
override (precision, epochs, batch sizes) on training and evaluation runs; Tip-Adapter-F trains with α 1.17 /
β 1 and is evaluated with α 0.5 / β 5.5 and ``DATASET.NUM_SHOTS <K>`` (its official test scripts); CRoFT
λ1 and λ2 in {1, 5, 10, 15, 20} with ratio 0.2 / ratio_text 0.5 and gen_step 10 (1 shot) or 1, every pair
evaluated (``--preset official`` and ``grid`` plan the same Setup-I runs, as the official test_setup1.py
evaluates all 25 pairs). Evaluation: closed-set accuracy on ImageNet (``test_id``),
-V2, -Sketch, -A, -R (400-way) and open-set detection against the held-out 600 classes (ID side: correctly
classified validation images, as the official evaluator).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Optional, Sequence

from launch import official
from launch.choices import check_trainers_and_cfgs
from launch.setup2 import common_overrides, config_path, dataset_config
from launch.sweep import Job, add_launcher_args, module_cli, plan_sweep, sweep_main

TEST_SETS = ["test_id", "imagenet_v2", "imagenet_s", "imagenet_a", "imagenet_r"]
TRAIN_DATASET, EVAL_DATASET = "ImageNet46", "ImageNetOOD46"  # DATASET.NAME of training / evaluation runs
OOD_LABEL = "ImageNet-600"  # the open set of every evaluation run: ImageNet-val images of the held-out classes


def settings(trainer: str, shots: int, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(directory tag, yacs overrides) of every CRoFT setting of the sweep (one empty setting otherwise)."""
    if not official.has_grid(trainer, 1):
        return [("", [])]
    grid = official.sweep_grid(trainer, 1, "ImageNet46", shots=shots, lambda1=args.lambda1, lambda2=args.lambda2,
                               gen_step=args.gen_step)
    return [("_" + s.tag, s.opts()) for s in grid]


def check_args(args: argparse.Namespace, evaluate: bool) -> None:
    """Refuse unknown trainers and configs in one line (choices and the nearest one) before planning."""
    check_trainers_and_cfgs(args.trainer, args.cfgs)


def train_jobs(args: argparse.Namespace, trainer: str) -> list[Job]:
    jobs = []
    out_root = os.path.join(args.output_root, trainer)
    prot = official.protocol(trainer, 1)
    error = prot.missing(common_overrides(args))
    if error:
        print(error, file=sys.stderr)
        raise SystemExit(2)
    for cfg, shots in itertools.product(args.cfgs or prot.cfgs, args.shots or prot.shots):
        for (tag, overrides), seed in itertools.product(settings(trainer, shots, args), args.seeds):
            group = f"imagenet46_{cfg}{tag}"
            out = os.path.join(out_root, group, f"seed{seed}", f"shots{shots}")
            argv = ["--root", args.root, "--seed", str(seed), "--trainer", trainer,
                    "--dataset-config-file", dataset_config("imagenet46"), "--config-file", config_path(trainer, cfg),
                    "--output-dir", out, "DATASET.NUM_SHOTS", str(shots), *prot.train_opts(cfg), *overrides,
                    "PROTOCOL.PRESET", args.preset, *common_overrides(args)]
            labels = {"kind": "train", "trainer": trainer, "method": args.method or trainer, "dataset": "ImageNet46",
                      "cfg": cfg, "setting": f"{tag.lstrip('_')}_shots{shots}".lstrip("_"), "group": group,
                      "domain": "test_id", "seed": seed, "shots": shots, "preset": args.preset, "selected": False}
            jobs.append(Job(f"{trainer}/{group}/seed{seed}/shots{shots}", out, argv, labels))
    return jobs


def eval_jobs(args: argparse.Namespace, trainer: str) -> list[Job]:
    jobs = []
    eval_root = os.path.join(args.eval_root, trainer)
    prot = official.protocol(trainer, 1)
    for tj in train_jobs(args, trainer):
        lab = tj.labels
        for test_set in args.test_sets:
            group = "imagenetood46" + lab["group"][len("imagenet46"):]
            out = os.path.join(eval_root, group, f"shots{lab['shots']}", test_set, f"seed{lab['seed']}")
            tail = tj.argv[tj.argv.index("--output-dir") + 2:]
            if not prot.eval_shots:  # official evaluation runs pass no NUM_SHOTS (Tip-Adapter-F's open-set one does)
                tail = [a for i, a in enumerate(tail) if not (a == "DATASET.NUM_SHOTS" or
                                                              (i > 0 and tail[i - 1] == "DATASET.NUM_SHOTS"))]
            argv = ["--root", args.root, "--seed", str(lab["seed"]), "--trainer", trainer,
                    "--dataset-config-file", dataset_config("imagenetood46"),
                    "--config-file", config_path(trainer, lab["cfg"]), "--output-dir", out, "--eval-only",
                    "--model-dir", tj.output_dir, *tail, *prot.eval_opts, *id_split(args), *common_overrides(args),
                    "TEST_OOD", test_set]  # the user's overrides win over the official evaluation values
            labels = dict(lab, kind="eval", domain=test_set, ood=OOD_LABEL, train_dir=tj.output_dir)
            jobs.append(Job(f"{trainer}/{group}/shots{lab['shots']}/{test_set}/seed{lab['seed']}", out, argv,
                            labels))
    return jobs


def id_split(args: argparse.Namespace) -> list[str]:
    """``--eval-id-split``: the split whose correctly classified images are the ID side of the evaluation runs'
    detection (default: the dataset config's, ``val`` as officially; ``test`` keeps the test images' scores)."""
    split = getattr(args, "eval_id_split", None)
    return ["TEST.OOD_ID_SPLIT", split] if split else []


def get_parser(trainer: Optional[str], evaluate: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=("Setup-I evaluation sweep (ImageNet variants + open-set)" if evaluate
                                             else "Setup-I training sweep (imagenet46)"))
    p.add_argument("--root", default=os.environ.get("DATA", ""), help="datasets folder (default: $DATA)")
    p.add_argument("--trainer", nargs="+", default=[trainer] if trainer else ["CRoFT"])
    p.add_argument("--method", default="")
    p.add_argument("--preset", choices=official.PRESETS, default="official",
                   help="official or grid (the same Setup-I plan: every CRoFT pair is evaluated officially)")
    p.add_argument("--cfgs", nargs="+", help="trainer configs (default: official, ViT_ep30)")
    p.add_argument("--shots", nargs="+", type=int, help="shots (default: official, 1 16 32; CLIP_Adapter 4)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--lambda1", nargs="+", type=float)
    p.add_argument("--lambda2", nargs="+", type=float)
    p.add_argument("--gen-step", type=int, help="CRoFT gen_step (default: 10 for 1 shot, else 1)")
    p.add_argument("--test-sets", nargs="+", default=TEST_SETS, choices=TEST_SETS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--backbone", default="")
    p.add_argument("--weights", default="")
    p.add_argument("--device", default="")
    p.add_argument("--output-root", default="output")
    p.add_argument("--eval-root", default="eval_setup1")
    if evaluate:
        p.add_argument("--eval-id-split", choices=("val", "test"),
                       help="ID side of the evaluation runs' detection (default: val, official); test also keeps the "
                            "test images' scores in scores.npz (scripts/CRoFT/test_energy.sh)")
    add_launcher_args(p)
    return p


def plan(argv: Optional[Sequence[str]] = None, trainer: Optional[str] = None,
         evaluate: bool = False) -> tuple[argparse.Namespace, list[Job]]:
    """Parse a driver command line and return (args, planned jobs); raises SystemExit on bad input."""
    return plan_sweep(sys.modules[__name__], argv, trainer, evaluate)


def main(argv: Optional[Sequence[str]] = None, trainer: Optional[str] = None, evaluate: bool = False) -> int:
    return sweep_main(sys.modules[__name__], "setup1", argv, trainer, evaluate)


if __name__ == "__main__":  # python -m launch.setup1 [--eval] FLAGS (the training driver; --eval: evaluation)
    sys.exit(module_cli(main, "setup1"))
