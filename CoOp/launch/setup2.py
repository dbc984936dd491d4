"""Setup-II sweeps (leave-one-domain-out training, then open-set evaluation) for every trainer.

Training runs:   output/<TRAINER>/<DATASET>_<CFG>[_<swept values>]/test_on_<domain>.json/seed<S>/shots<K>/
Evaluation runs: eval_open_ood/<TRAINER>/<DATASET>_<OOD>_<CFG>[_<swept values>]/test_on_<domain>.json/seed<S>/

The directory names encode every swept value (the official VLCS sweep silently skipped two of its three ratio
settings because they did not), and a run is skipped only when its ``done`` marker exists. The official grids:

* CRoFT, PACS: lambda2 in {1000, 100, 10, 1, 0}, lambda1 15, ratio 0.2 / ratio_text 0.5, gen_step 0 (rn50_ep30)
  or 1 (ViT_ep30);
* CRoFT, VLCS: lambda2 as above x lambda1 in {15, 5, 0} x (ratio, ratio_text) in {(0.2,0.5), (0.2,0.0),
  (0.5,0.0)}, gen_step 5;
* baselines: one run per (dataset, config, domain, seed).

Seeds 1-3, 16 shots, configs rn50_ep30 and ViT_ep30. The official open-set evaluation of CRoFT uses
ratio 0.5 / ratio_text 0.0 (``--eval-ratio``/``--eval-ratio-text``).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Optional, Sequence

from launch.sweep import COOP_DIR, Job, add_launcher_args, plan_sweep, sweep_main

OFFICIAL_DOMAINS = {
    "PACS": ["sketch", "photo", "cartoon", "art_painting"],
    "VLCS": ["labelme", "sun", "pascal", "caltech"],
}
OFFICIAL_OOD = ["DTD", "Food101", "Caltech101"]
OFFICIAL_CFGS = ["rn50_ep30", "ViT_ep30"]
CROFT_GRID = {
    "PACS": {"lambda1": [15.0], "lambda2": [1000.0, 100.0, 10.0, 1.0, 0.0], "ratios": [(0.2, 0.5)],
             "gen_step": {"rn50_ep30": 0, "ViT_ep30": 1}},
    "VLCS": {"lambda1": [15.0, 5.0, 0.0], "lambda2": [1000.0, 100.0, 10.0, 1.0, 0.0],
             "ratios": [(0.2, 0.5), (0.2, 0.0), (0.5, 0.0)], "gen_step": {"rn50_ep30": 5, "ViT_ep30": 5}},
}
OUTPUT_ROOT = {"CoOp": "COOP", "CoCoOp": "COCOOP"}


def fmt(v: float) -> str:
    return f"{v:g}"


def discover_domains(root: str, dataset: str) -> list[str]:
    """Held-out domains: the official list, else the ``test_on_<domain>.json`` files found in the data."""
    if dataset in OFFICIAL_DOMAINS:
        return OFFICIAL_DOMAINS[dataset]
    import datasets  # noqa: F401  (registers the dataset classes)
    from dassl.data.datasets import DATASET_REGISTRY

    folder = os.path.join(root, DATASET_REGISTRY.get(dataset).dataset_dir)
    if not os.path.isdir(folder):
        raise SystemExit(f"error: dataset folder not found: {folder}")
    return sorted(f[len("test_on_"):-5] for f in os.listdir(folder) if f.startswith("test_on_") and f.endswith(".json"))


def settings(trainer: str, dataset: str, cfg: str, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(directory tag, yacs overrides) for every swept hyper-parameter setting of a trainer."""
    if trainer != "CRoFT":
        return [("", [])]
    grid = CROFT_GRID.get(dataset, CROFT_GRID["PACS"])
    l1s = args.lambda1 or grid["lambda1"]
    l2s = args.lambda2 or grid["lambda2"]
    ratios = [tuple(float(x) for x in r.split(",")) for r in args.ratios] if args.ratios else grid["ratios"]
    gen = args.gen_step if args.gen_step is not None else grid["gen_step"].get(cfg, 1)
    out = []
    for l1, l2, (r, rt) in itertools.product(l1s, l2s, ratios):
        tag = f"_l1-{fmt(l1)}_l2-{fmt(l2)}_r{fmt(r)}_rt{fmt(rt)}_g{gen}"
        out.append((tag, ["TRAINER.CRoFT.WCCF", "True", "TRAINER.CRoFT.gen_step", str(gen),
                          "TRAINER.CRoFT.ratio", fmt(r), "TRAINER.CRoFT.ratio_text", fmt(rt),
                          "TRAINER.CRoFT.lambda1", fmt(l1), "TRAINER.CRoFT.lambda2", fmt(l2)]))
    return out


def config_path(trainer: str, cfg: str) -> str:
    path = os.path.join("configs", "trainers", trainer, f"{cfg}.yaml")
    if not os.path.isfile(os.path.join(COOP_DIR, path)):
        raise SystemExit(f"error: trainer config not found: {os.path.join(COOP_DIR, path)}")
    return os.path.join(COOP_DIR, path)


def dataset_config(name: str) -> str:
    path = os.path.join("configs", "datasets", f"{name}.yaml")
    if not os.path.isfile(os.path.join(COOP_DIR, path)):
        raise SystemExit(f"error: dataset config not found: {os.path.join(COOP_DIR, path)}")
    return os.path.join(COOP_DIR, path)


def train_jobs(args: argparse.Namespace, trainer: str) -> list[Job]:
    jobs = []
    out_root = os.path.join(args.output_root, OUTPUT_ROOT.get(trainer, trainer))
    for dataset, cfg in itertools.product(args.datasets, args.cfgs):
        domains = args.domains or discover_domains(args.root, dataset)
        for (tag, overrides), domain, seed in itertools.product(settings(trainer, dataset, cfg, args), domains,
                                                                 args.seeds):
            group = f"{dataset}_{cfg}{tag}"
            env = f"test_on_{domain}.json"
            out = os.path.join(out_root, group, env, f"seed{seed}", f"shots{args.shots}")
            argv = ["--root", args.root, "--seed", str(seed), "--trainer", trainer,
                    "--dataset-config-file", dataset_config(dataset), "--config-file", config_path(trainer, cfg),
                    "--output-dir", out, "TEST_ENV", env, "DATASET.NUM_SHOTS", str(args.shots), *overrides,
                    *common_overrides(args)]
            labels = {"kind": "train", "trainer": trainer, "method": args.method or trainer, "dataset": dataset,
                      "cfg": cfg, "setting": tag.lstrip("_"), "group": group, "domain": domain, "seed": seed}
            jobs.append(Job(f"{trainer}/{group}/{env}/seed{seed}", out, argv, labels))
    return jobs


def eval_jobs(args: argparse.Namespace, trainer: str) -> list[Job]:
    jobs = []
    eval_root = os.path.join(args.eval_root, OUTPUT_ROOT.get(trainer, trainer))
    for tj in train_jobs(args, trainer):
        lab = tj.labels
        for ood in args.ood:
            name = f"{lab['dataset']}_{ood}"
            group = f"{name}_{lab['cfg']}" + (f"_{lab['setting']}" if lab["setting"] else "")
            env = f"test_on_{lab['domain']}.json"
            out = os.path.join(eval_root, group, env, f"seed{lab['seed']}")
            extra = []
            if trainer == "CRoFT":
                extra = ["TRAINER.CRoFT.ratio", fmt(args.eval_ratio), "TRAINER.CRoFT.ratio_text",
                         fmt(args.eval_ratio_text)]
            argv = ["--root", args.root, "--seed", str(lab["seed"]), "--trainer", trainer,
                    "--dataset-config-file", dataset_config(name), "--config-file", config_path(trainer, lab["cfg"]),
                    "--output-dir", out, "--eval-only", "--model-dir", tj.output_dir, "TEST_ENV", env,
                    *tj.argv[tj.argv.index("TEST_ENV") + 2:], *extra]
            labels = dict(lab, kind="eval", ood=ood, train_dir=tj.output_dir)
            jobs.append(Job(f"{trainer}/{group}/{env}/seed{lab['seed']}", out, _drop_shots(argv), labels))
    return jobs


def _drop_shots(argv: list[str]) -> list[str]:
    """Evaluation runs keep NUM_SHOTS at -1 like the official scripts (it only changes the unused train_x)."""
    out = list(argv)
    if "DATASET.NUM_SHOTS" in out:
        i = out.index("DATASET.NUM_SHOTS")
        del out[i:i + 2]
    return out


def common_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.epochs:
        extra += ["OPTIM.MAX_EPOCH", str(args.epochs)]
    if args.backbone:
        extra += ["MODEL.BACKBONE.NAME", args.backbone]
    if args.weights:
        extra += ["MODEL.BACKBONE.WEIGHTS", args.weights]
    if args.device:
        extra += ["DEVICE", args.device]
    return extra + list(args.opts or [])


def get_parser(trainer: Optional[str] = None, evaluate: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=("Setup-II open-set evaluation sweep" if evaluate
                                             else "Setup-II training sweep (leave-one-domain-out)"))
    p.add_argument("--root", default=os.environ.get("DATA", ""),
                   help="datasets folder (default: the DATA environment variable)")
    p.add_argument("--trainer", nargs="+", default=[trainer] if trainer else ["CRoFT"])
    p.add_argument("--method", default="", help="label of the method in collected tables (default: trainer)")
    p.add_argument("--datasets", nargs="+", default=["PACS", "VLCS"])
    p.add_argument("--cfgs", nargs="+", default=OFFICIAL_CFGS, help="trainer config names")
    p.add_argument("--domains", nargs="+", help="held-out domains (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--lambda1", nargs="+", type=float, help="CRoFT lambda1 values (default: official grid)")
    p.add_argument("--lambda2", nargs="+", type=float, help="CRoFT lambda2 values (default: official grid)")
    p.add_argument("--ratios", nargs="+", help="CRoFT ratio,ratio_text pairs, e.g. 0.2,0.5")
    p.add_argument("--gen-step", type=int, help="CRoFT gen_step (default: official per config)")
    p.add_argument("--epochs", type=int, help="override OPTIM.MAX_EPOCH")
    p.add_argument("--backbone", default="", help="override MODEL.BACKBONE.NAME")
    p.add_argument("--weights", default="", help="override MODEL.BACKBONE.WEIGHTS (a local file)")
    p.add_argument("--device", default="", help="DEVICE for every run (auto, cpu, cuda, cuda:N)")
    p.add_argument("--output-root", default="output")
    p.add_argument("--eval-root", default="eval_open_ood")
    p.add_argument("--ood", nargs="+", default=OFFICIAL_OOD, help="open-set datasets (evaluation)")
    p.add_argument("--eval-ratio", type=float, default=0.5, help="CRoFT ratio at evaluation (official 0.5)")
    p.add_argument("--eval-ratio-text", type=float, default=0.0, help="CRoFT ratio_text at evaluation (official 0)")
    add_launcher_args(p)
    return p


def plan(argv: Optional[Sequence[str]] = None, trainer: Optional[str] = None,
         evaluate: bool = False) -> tuple[argparse.Namespace, list[Job]]:
    """Parse a driver command line and return (args, planned jobs); raises SystemExit on bad input."""
    return plan_sweep(sys.modules[__name__], argv, trainer, evaluate)


def main(argv: Optional[Sequence[str]] = None, trainer: Optional[str] = None, evaluate: bool = False) -> int:
    return sweep_main(sys.modules[__name__], "setup2", argv, trainer, evaluate)
