"""Setup-II sweeps (leave-one-domain-out training, then open-set evaluation) for every trainer.

Training runs:   output/<TRAINER>/<DATASET>_<CFG>[_<swept values>]/test_on_<domain>.json/seed<S>/shots<K>/
Evaluation runs: eval_open_ood/<TRAINER>/<DATASET>_<OOD>_<CFG>[_<swept values>]/test_on_<domain>.json/seed<S>/

Evaluation is one job per trained model: ``train.py --eval-only --eval-open-set`` loads the model once, encodes
each image once and writes every open-set dataset's run directory (the records of separate runs; an open set whose
ID samples differ, as the official draw order makes them, gets its own ID side within the pass).
``--eval-per-ood`` plans one job per run directory instead (the official flow).

The directory names encode every swept value (the official VLCS sweep silently skipped two of its three ratio
settings because they did not), and a run is skipped only when its ``done`` marker exists. What runs comes from
:mod:`launch.official` (configs, shots, every official override, the CRoFT grids and selected models):

* ``--preset official`` (default): the committed plan. CRoFT trains what the official sweep trained (VLCS: the
  (0.2, 0.5) ratio pair only, 15 settings per config) plus the "selected" models the official open-set scripts
  load (PACS λ1 5 / λ2 1000, VLCS λ1 15 / λ2 1000) and evaluates only those, at ρ 0.5 / ρ_t 0; baselines: one
  run per (dataset, config, domain, seed). DPLCLIP and Bayes-CAL evaluation runs keep ``DATASET.NUM_SHOTS``
  (16), as their official evaluation scripts pass it.
* ``--preset grid``: every setting of the official loops (VLCS: three ratio pairs, 45 per config) is trained and
  evaluated.

Explicit ``--lambda1/--lambda2/--ratios/--gen-step`` replace the grid's values (and are what gets evaluated).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Optional, Sequence

from launch import official
from launch.choices import check_names, check_trainers_and_cfgs, open_set_names
from launch.official import Setting, fmt
from launch.sweep import COOP_DIR, Job, add_launcher_args, module_cli, plan_sweep, sweep_main

OFFICIAL_DOMAINS = {
    "PACS": ["sketch", "photo", "cartoon", "art_painting"],
    "VLCS": ["labelme", "sun", "pascal", "caltech"],
}
OFFICIAL_OOD = ["DTD", "Food101", "Caltech101"]


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


def lodo_datasets() -> list[str]:
    """Setup-II datasets: the leave-one-domain-out datasets with a ``configs/datasets/<name>.yaml`` (not their
    ``<ID>_<OOD>`` open-set variants)."""
    import datasets  # noqa: F401  (registers the dataset classes)
    from dassl.data.datasets import DATASET_REGISTRY
    from datasets.lodo import LODODataset
    from datasets.openset import LODOOpenSet
    from launch.choices import dataset_config_names

    def lodo(name: str) -> bool:
        cls = DATASET_REGISTRY.get(name) if name in DATASET_REGISTRY else None
        return isinstance(cls, type) and issubclass(cls, LODODataset) and not issubclass(cls, LODOOpenSet)

    return [n for n in dataset_config_names() if lodo(n)]


def check_args(args: argparse.Namespace, evaluate: bool) -> None:
    """Refuse unknown trainers, configs, datasets, held-out domains and (evaluation) open-set datasets in one line
    naming the value, the choices and the nearest one, before anything is planned."""
    check_trainers_and_cfgs(args.trainer, args.cfgs)
    check_names("--datasets", args.datasets, lodo_datasets(), "a Setup-II dataset")
    for dataset in args.datasets:
        if args.domains:
            check_names("--domains", args.domains, discover_domains(args.root, dataset), f"a {dataset} domain")
        if evaluate:
            check_names("--ood", args.ood, open_set_names(dataset), f"an open-set dataset of {dataset}")


def _explicit(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.lambda1, args.lambda2, args.ratios, args.gen_step))


def _ratios(args: argparse.Namespace) -> Optional[list[tuple[float, float]]]:
    if not args.ratios:
        return None
    try:
        return [tuple(float(x) for x in r.split(",")) for r in args.ratios]  # type: ignore[misc]
    except ValueError:
        raise SystemExit(f"error: --ratios takes ratio,ratio_text pairs such as 0.2,0.5, got {args.ratios}")


def settings(trainer: str, dataset: str, cfg: str, args: argparse.Namespace,
             evaluate: bool = False) -> list[tuple[str, list[str], bool]]:
    """(directory tag, yacs overrides, selected?) of every setting trained (or, ``evaluate``, evaluated)."""
    if not official.has_grid(trainer, 2):
        return [("", [], False)]
    grid = official.sweep_grid(trainer, 2, dataset, cfg, args.shots, args.lambda1, args.lambda2, _ratios(args),
                               args.gen_step, preset=args.preset)
    sel = None if _explicit(args) or args.preset == "grid" else official.selected(trainer, 2, dataset, cfg)
    chosen: list[Setting] = [sel] if (evaluate and sel) else grid + ([sel] if sel and sel not in grid else [])
    return [("_" + s.tag, s.opts(), s == sel) for s in chosen]


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
    out_root = os.path.join(args.output_root, trainer)  # output/<trainer name>, as configs/ and scripts/
    prot = official.protocol(trainer, 2)
    shots = args.shots or prot.shots[0]
    for dataset, cfg in itertools.product(args.datasets, args.cfgs or prot.cfgs):
        domains = args.domains or discover_domains(args.root, dataset)
        for (tag, overrides, sel), domain, seed in itertools.product(settings(trainer, dataset, cfg, args),
                                                                      domains, args.seeds):
            group = f"{dataset}_{cfg}{tag}"
            env = f"test_on_{domain}.json"
            out = os.path.join(out_root, group, env, f"seed{seed}", f"shots{shots}")
            argv = ["--root", args.root, "--seed", str(seed), "--trainer", trainer,
                    "--dataset-config-file", dataset_config(dataset), "--config-file", config_path(trainer, cfg),
                    "--output-dir", out, "TEST_ENV", env, "DATASET.NUM_SHOTS", str(shots),
                    *prot.train_opts(cfg), *overrides, "PROTOCOL.PRESET", args.preset, *common_overrides(args)]
            labels = {"kind": "train", "trainer": trainer, "method": args.method or trainer, "dataset": dataset,
                      "cfg": cfg, "setting": tag.lstrip("_"), "group": group, "domain": domain, "seed": seed,
                      "preset": args.preset, "selected": sel}
            jobs.append(Job(f"{trainer}/{group}/{env}/seed{seed}", out, argv, labels))
    return jobs


def eval_jobs(args: argparse.Namespace, trainer: str) -> list[Job]:
    """One evaluation job per trained model: a ``train.py --eval-open-set`` pass over the ``--ood`` datasets that
    writes each (model, open-set dataset) run directory (:func:`one_pass_jobs`); ``--eval-per-ood``: one job per
    run (official flow)."""
    jobs = []
    eval_root = os.path.join(args.eval_root, trainer)
    prot = official.protocol(trainer, 2)
    wanted = {(ds, cfg, tag.lstrip("_")) for ds in args.datasets for cfg in (args.cfgs or prot.cfgs)
              for tag, _, _ in settings(trainer, ds, cfg, args, evaluate=True)}
    for tj in train_jobs(args, trainer):
        lab = tj.labels
        if (lab["dataset"], lab["cfg"], lab["setting"]) not in wanted:
            continue
        runs = []
        for ood in args.ood:
            name = f"{lab['dataset']}_{ood}"
            group = f"{name}_{lab['cfg']}" + (f"_{lab['setting']}" if lab["setting"] else "")
            env = f"test_on_{lab['domain']}.json"
            out = os.path.join(eval_root, group, env, f"seed{lab['seed']}")
            extra = list(prot.eval_opts)
            if args.eval_ratio is not None:
                extra += ["TRAINER.CRoFT.ratio", fmt(args.eval_ratio)]
            if args.eval_ratio_text is not None:
                extra += ["TRAINER.CRoFT.ratio_text", fmt(args.eval_ratio_text)]
            argv = ["--root", args.root, "--seed", str(lab["seed"]), "--trainer", trainer,
                    "--dataset-config-file", dataset_config(name), "--config-file", config_path(trainer, lab["cfg"]),
                    "--output-dir", out, "--eval-only", "--model-dir", tj.output_dir, "TEST_ENV", env,
                    *tj.argv[tj.argv.index("TEST_ENV") + 2:], *extra, *common_overrides(args)]  # user's win
            labels = dict(lab, kind="eval", ood=ood, train_dir=tj.output_dir)
            runs.append(Job(f"{trainer}/{group}/{env}/seed{lab['seed']}", out,
                            argv if prot.eval_shots else _drop_shots(argv), labels))
        jobs.extend(runs if args.eval_per_ood else one_pass_jobs(runs))
    return jobs


def one_pass_jobs(runs: list[Job]) -> list[Job]:
    """The runs of one trained model as passes over the open-set datasets that may share one
    (``datasets.openset.pass_key``: every open set of one ID dataset, whatever its ID samples, K and draw order:
    the pass collects an open set's own ID side where it differs); a group of one stays a plain run."""
    import datasets  # noqa: F401  (registers the dataset classes)
    from datasets.openset import pass_key

    groups: dict[tuple, list[Job]] = {}
    for r in runs:
        name = os.path.splitext(os.path.basename(r.argv[r.argv.index("--dataset-config-file") + 1]))[0]
        groups.setdefault(pass_key(name), []).append(r)
    return [one_pass_job(g) if len(g) > 1 else g[0] for g in groups.values()]


def one_pass_job(runs: list[Job]) -> Job:
    """The evaluation runs of one trained model (argv equal but for the dataset config and output directory) as
    one ``train.py --eval-open-set`` job; the runs stay its ``parts`` (manifest, ``done``)."""
    def strip(argv: list[str]) -> list[str]:
        out = list(argv)
        for flag in ("--dataset-config-file", "--output-dir"):
            i = out.index(flag)
            del out[i:i + 2]
        return out

    head = strip(runs[0].argv)
    cut = head.index("--eval-only") + 3  # after --eval-only --model-dir DIR: the flags end before TEST_ENV
    pairs = [a for r in runs for a in ("--eval-open-set", r.argv[r.argv.index("--dataset-config-file") + 1],
                                       r.output_dir)]
    first = runs[0].labels
    oods = [r.labels["ood"] for r in runs]
    name = runs[0].name.replace(f"{first['dataset']}_{oods[0]}_", f"{first['dataset']}_{'+'.join(oods)}_", 1)
    labels = dict(first, ood="+".join(oods))
    parts = [{"name": r.name, "output_dir": r.output_dir, "labels": r.labels} for r in runs]
    return Job(name, runs[0].output_dir, head[:cut] + pairs + head[cut:], labels, parts=parts)


def _drop_shots(argv: list[str]) -> list[str]:
    """Evaluation runs keep NUM_SHOTS at -1 like most official evaluation scripts (it changes the unused train_x
    and the random draws after it); trainers whose official scripts pass it (``Protocol.eval_shots``) keep it."""
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
    p.add_argument("--preset", choices=official.PRESETS, default="official",
                   help="official: the committed plan incl. CRoFT's selected evaluation models; grid: full sweep")
    p.add_argument("--cfgs", nargs="+", help="trainer config names (default: official, rn50_ep30 ViT_ep30)")
    p.add_argument("--domains", nargs="+", help="held-out domains (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--shots", type=int, help="shots (default: official, 16)")
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
    p.add_argument("--eval-per-ood", action="store_true",
                   help="one evaluation run per (trained model, open-set dataset), as the official scripts (default: "
                        "one pass per trained model over all --ood datasets, same run directories and records)")
    p.add_argument("--eval-ratio", type=float, help="CRoFT ratio at evaluation (default: official, 0.5)")
    p.add_argument("--eval-ratio-text", type=float, help="CRoFT ratio_text at evaluation (default: official, 0)")
    add_launcher_args(p)
    return p


def plan(argv: Optional[Sequence[str]] = None, trainer: Optional[str] = None,
         evaluate: bool = False) -> tuple[argparse.Namespace, list[Job]]:
    """Parse a driver command line and return (args, planned jobs); raises SystemExit on bad input."""
    return plan_sweep(sys.modules[__name__], argv, trainer, evaluate)


def main(argv: Optional[Sequence[str]] = None, trainer: Optional[str] = None, evaluate: bool = False) -> int:
    return sweep_main(sys.modules[__name__], "setup2", argv, trainer, evaluate)


if __name__ == "__main__":  # python -m launch.setup2 [--eval] FLAGS (the training driver; --eval: evaluation)
    sys.exit(module_cli(main, "setup2"))
