"""The official hyper-parameters, one table per (trainer, setup), and the sweep grids (spec sections 3, 4, 1.10).

Every driver (``launch/setup1.py``, ``launch/setup2.py``, ``scripts/*/run_*.py``, ``scripts/*/test_*.py``), the
shell scripts (``python -m launch.official CRoFT 2 --cfg ViT_ep30`` prints the overrides) and the tests read this
module, so a value lives in one place:

* :data:`OFFICIAL` -- config names, shots, ``KEY VALUE`` overrides for training *and* evaluation runs (α/β of
  Tip-Adapter-F, precision, Bayes-CAL weights, prompt lengths), per-config overrides (epochs, batch sizes, learning
  rate), the evaluation-only overrides (CRoFT's residual ratios at test time; Tip-Adapter-F's Setup-I α 0.5 /
  β 5.5), whether evaluation runs keep ``DATASET.NUM_SHOTS`` (Tip-Adapter-F Setup-I, DPLCLIP and Bayes-CAL
  Setup-II: their official evaluation scripts pass it) and, for CRoFT Setup-II, the "selected" models the official
  open-set scripts evaluated (PACS λ1 5 / λ2 1000, VLCS λ1 15 / λ2 1000, both at ρ 0.5 / ρ_t 0.0);
* :data:`GRIDS` / :func:`sweep_grid` -- the CRoFT settings the official sweeps trained, per setup and dataset
  (VLCS: one ratio pair); :data:`GRID_PRESET` -- what ``--preset grid`` sweeps instead (VLCS: three pairs).

Presets: ``official`` trains the committed grid plus the selected models and evaluates the selected models
(Setup-II) or every trained setting (Setup-I, whose scripts evaluate all 25 λ pairs); ``grid`` trains and
evaluates the full grid of the official loops.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

PRESETS = ("official", "grid")


def fmt(v: float) -> str:
    """Compact number for directory tags and overrides (15.0 -> "15", 0.2 -> "0.2")."""
    return f"{float(v):g}"


@dataclass(frozen=True)
class Setting:
    """One swept CRoFT setting: (λ1, λ2, training ρ / ρ_t, gen_step)."""

    lambda1: float
    lambda2: float
    ratio: float
    ratio_text: float
    gen_step: int

    @property
    def tag(self) -> str:
        return (f"l1-{fmt(self.lambda1)}_l2-{fmt(self.lambda2)}_r{fmt(self.ratio)}_rt{fmt(self.ratio_text)}"
                f"_g{self.gen_step}")

    def opts(self) -> list[str]:
        return ["TRAINER.CRoFT.WCCF", "True", "TRAINER.CRoFT.gen_step", str(self.gen_step),
                "TRAINER.CRoFT.ratio", fmt(self.ratio), "TRAINER.CRoFT.ratio_text", fmt(self.ratio_text),
                "TRAINER.CRoFT.lambda1", fmt(self.lambda1), "TRAINER.CRoFT.lambda2", fmt(self.lambda2)]


@dataclass(frozen=True)
class Protocol:
    """The official plan of one trainer in one setup."""

    trainer: str
    setup: int
    cfgs: tuple[str, ...]
    shots: tuple[int, ...]
    opts: tuple[str, ...] = ()                              # training and evaluation runs
    cfg_opts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per trainer config
    eval_opts: tuple[str, ...] = ()                         # evaluation runs only
    eval_shots: bool = False                                # evaluation runs keep DATASET.NUM_SHOTS <K>
    selected: Mapping[str, Mapping[str, Setting]] = field(default_factory=dict)  # dataset -> cfg -> model
    note: str = ""
    requires: Mapping[str, str] = field(default_factory=dict)  # override key the user must give -> why

    def missing(self, overrides: Sequence[str]) -> Optional[str]:
        """The one-line error for the first required key not set to a non-empty value in ``overrides``."""
        given = {k: v for k, v in zip(overrides[::2], overrides[1::2])}
        for key, why in self.requires.items():
            if given.get(key, "").strip() in ("", "[]", "()"):
                return f"error: {self.trainer} cannot run Setup-{self.setup} as the official code does ({why}); " \
                       f"pass the named fix after '--', e.g. -- {key} \"['imagenet']\""
        return None

    def train_opts(self, cfg: str) -> list[str]:
        """Overrides of a training run with trainer config ``cfg`` (unknown configs get no per-config values)."""
        return [*self.cfg_opts.get(cfg, ()), *self.opts]

    def test_opts(self, cfg: str) -> list[str]:
        """Overrides of an evaluation run of a model trained with ``cfg``."""
        return [*self.train_opts(cfg), *self.eval_opts]


def _cfg(batch: int, lr: float, epochs: int) -> tuple[str, ...]:
    return ("DATALOADER.TRAIN_X.BATCH_SIZE", str(batch), "DATALOADER.TEST.BATCH_SIZE", "100",
            "OPTIM.LR", fmt(lr), "OPTIM.MAX_EPOCH", str(epochs))


STANDARD_CFGS = {"rn50_ep30": _cfg(32, 0.002, 30), "ViT_ep30": _cfg(32, 0.002, 30)}
COCOOP_CFGS = {"rn50_ep30": _cfg(32, 0.002, 30), "ViT_ep30": _cfg(4, 0.002, 30)}
TIP_CFGS = {"rn50_ep30": _cfg(256, 0.002, 30), "ViT_ep30": _cfg(32, 0.001, 50)}
SETUP2_CFGS = ("rn50_ep30", "ViT_ep30")
SETUP1_CFGS = ("ViT_ep30",)
SETUP1_SHOTS = (1, 16, 32)
PROMPT_OPTS = ("N_CTX", "16", "CSC", "False", "CLASS_TOKEN_POSITION", "end")  # CTP=end NCTX=16 CSC=False


def _node(node: str, pairs: Sequence[str]) -> tuple[str, ...]:
    """``KEY VALUE`` pairs of ``TRAINER.<node>``."""
    return tuple(x for k, v in zip(pairs[::2], pairs[1::2]) for x in (f"TRAINER.{node}.{k}", v))


BCAL_OPTS = (*_node("BCAL", PROMPT_OPTS), "TRAINER.BCAL.ALPHA1", "0.01", "TRAINER.BCAL.ALPHA2", "0.5",
             "TRAINER.BCAL.ALPHA3", "0.01", "TRAINER.BCAL.PREC", "fp16")
TIP_EVAL_SETUP1 = ("TRAINER.TIP_ADAPTER.ALPHA", "0.5", "TRAINER.TIP_ADAPTER.BETA", "5.5")  # test_setup1.py
# LoCoOp (not in the CRoFT paper; "official" = the authors' repository, AtsuMiyai/LoCoOp): CoOp's prompt settings,
# their fp16, λ 0.25 and top-K 200 of ImageNet-1k's 1000 classes as the ratio 0.2 (K scales with the classes);
# epochs, shots and model selection follow the project's setups as for every baseline (theirs: 50 epochs, last epoch)
LOCOOP_OPTS = _node("LOCOOP", (*PROMPT_OPTS, "PREC", "fp16", "LAMBDA", "0.25", "TOPK", "0", "TOPK_RATIO", "0.2"))
CROFT_EVAL = {1: ("TRAINER.CRoFT.ratio", "0.2", "TRAINER.CRoFT.ratio_text", "0.5"),
              2: ("TRAINER.CRoFT.ratio", "0.5", "TRAINER.CRoFT.ratio_text", "0")}
SELECTED_SETUP2 = {
    # the model directories the official open-set scripts load: PACS_<CFG>_5_1000 and VLCS_<CFG>_15_1000
    # (training ρ / ρ_t 0.2 / 0.5: the croft_pacs*.sh values, and the only VLCS pair the committed sweep trains)
    "PACS": {"rn50_ep30": Setting(5, 1000, 0.2, 0.5, 0), "ViT_ep30": Setting(5, 1000, 0.2, 0.5, 1)},
    "VLCS": {"rn50_ep30": Setting(15, 1000, 0.2, 0.5, 5), "ViT_ep30": Setting(15, 1000, 0.2, 0.5, 5)},
}


def _table() -> dict[tuple[str, int], Protocol]:
    t: dict[tuple[str, int], Protocol] = {}

    def add(trainer: str, setup: int, **kw) -> None:
        kw.setdefault("cfgs", SETUP1_CFGS if setup == 1 else SETUP2_CFGS)
        kw.setdefault("shots", SETUP1_SHOTS if setup == 1 else (16,))
        kw.setdefault("cfg_opts", STANDARD_CFGS)
        t[(trainer, setup)] = Protocol(trainer, setup, **kw)

    for s in (1, 2):
        add("ZeroshotCLIP", s, opts=("TRAINER.ZSCLIP.PREC", "fp16"), note="no training; single template per dataset")
        add("CoOp", s, opts=(*_node("COOP", PROMPT_OPTS), "TRAINER.COOP.PREC", "fp16"))
        add("CoCoOp", s, cfg_opts=COCOOP_CFGS, opts=(*_node("COCOOP", PROMPT_OPTS), "TRAINER.COCOOP.PREC", "fp16"))
        # the official DPLCLIP / Bayes-CAL Setup-II evaluation scripts pass DATASET.NUM_SHOTS 16
        add("DPLCLIP", s, opts=(*_node("DPLCLIP", PROMPT_OPTS), "TRAINER.DPLCLIP.PREC", "fp16"), eval_shots=s == 2)
        add("BCAL", s, opts=BCAL_OPTS, note="Bayes-CAL; the official Setup-I scripts cannot run (no domain names)",
            requires={"TRAINER.BCAL.DOMAIN_NAMES": "ImageNet46 has no domain names"} if s == 1 else {},
            eval_shots=s == 2)
        add("LoCoOp", s, opts=LOCOOP_OPTS, note="the authors' LoCoOp settings (λ 0.25, K = 0.2 x classes); "
                                                "GL-MCM: -- TEST.OOD_SCORES with gl_mcm")
    add("CLIP_Adapter", 1, shots=(4,), opts=("TRAINER.CLIP_ADAPTER.RATIO", "0.2", "TRAINER.CLIP_ADAPTER.PREC", "fp32"))
    add("CLIP_Adapter", 2, opts=("TRAINER.CLIP_ADAPTER.RATIO", "0.2", "TRAINER.CLIP_ADAPTER.PREC", "fp32"))
    add("TIP_ADAPTER", 1, cfg_opts=TIP_CFGS, opts=("TRAINER.TIP_ADAPTER.ALPHA", "1.17", "TRAINER.TIP_ADAPTER.BETA",
                                                   "1", "TRAINER.TIP_ADAPTER.PREC", "fp16"),
        eval_opts=TIP_EVAL_SETUP1, eval_shots=True,
        note="evaluated with alpha 0.5 / beta 5.5 (test_setup1.py); the open-set script passes DATASET.NUM_SHOTS")
    add("TIP_ADAPTER", 2, cfg_opts=TIP_CFGS, opts=("TRAINER.TIP_ADAPTER.ALPHA", "1", "TRAINER.TIP_ADAPTER.BETA",
                                                   "10", "TRAINER.TIP_ADAPTER.PREC", "fp16"))
    add("CRoFT", 1, opts=("TRAINER.CRoFT.PREC", "fp32"), eval_opts=CROFT_EVAL[1],
        note="evaluates all 25 (λ1, λ2) pairs, as test_setup1.py")
    add("CRoFT", 2, opts=("TRAINER.CRoFT.PREC", "fp32"), eval_opts=CROFT_EVAL[2],
        selected=SELECTED_SETUP2,
        note="open-set evaluation of the selected models at ρ 0.5 / ρ_t 0")
    return t


OFFICIAL: dict[tuple[str, int], Protocol] = _table()

L_SETUP1 = (1.0, 5.0, 10.0, 15.0, 20.0)
L2_SETUP2 = (1000.0, 100.0, 10.0, 1.0, 0.0)
GRIDS: dict[tuple[str, int], dict[str, dict]] = {
    ("CRoFT", 1): {"ImageNet46": {"lambda1": L_SETUP1, "lambda2": L_SETUP1, "ratios": ((0.2, 0.5),),
                                  "gen_step": {"shots1": 10, "default": 1}}},
    ("CRoFT", 2): {
        "PACS": {"lambda1": (15.0,), "lambda2": L2_SETUP2, "ratios": ((0.2, 0.5),),
                 "gen_step": {"rn50_ep30": 0, "ViT_ep30": 1}},
        # run_setup2.py loops over three (ratio, ratio_text) pairs, but croft_vlcs*.sh name the output directory
        # without them and skip an existing directory: only the first pair, (0.2, 0.5), ever trained
        "VLCS": {"lambda1": (15.0, 5.0, 0.0), "lambda2": L2_SETUP2, "ratios": ((0.2, 0.5),),
                 "gen_step": {"rn50_ep30": 5, "ViT_ep30": 5}},
    },
}
"""CRoFT sweep grids per (trainer, setup) and dataset: what the official sweeps trained (``--preset official``);
other trainers have one setting (no grid)."""

GRID_PRESET: dict[tuple[str, int], dict[str, dict]] = {
    ("CRoFT", 2): {"VLCS": {"ratios": ((0.2, 0.5), (0.2, 0.0), (0.5, 0.0))}},
}
"""Values ``--preset grid`` uses instead of :data:`GRIDS`' (the loops the official scripts wrote, e.g. VLCS's three
ratio pairs, of which the official sweep trained only the first)."""


def protocol(trainer: str, setup: int) -> Protocol:
    """The official table of a trainer; an unlisted trainer (e.g. a plug-in) gets an empty one."""
    if setup not in (1, 2):
        raise SystemExit(f"error: setup must be 1 or 2, got {setup}")
    return OFFICIAL.get((trainer, setup)) or Protocol(trainer, setup, SETUP1_CFGS if setup == 1 else SETUP2_CFGS,
                                                       SETUP1_SHOTS if setup == 1 else (16,))


def has_grid(trainer: str, setup: int) -> bool:
    return (trainer, setup) in GRIDS


def sweep_grid(trainer: str, setup: int, dataset: str, cfg: str = "", shots: int = 16,
               lambda1: Optional[Sequence[float]] = None, lambda2: Optional[Sequence[float]] = None,
               ratios: Optional[Sequence[tuple[float, float]]] = None,
               gen_step: Optional[int] = None, preset: str = "official") -> list[Setting]:
    """The CRoFT settings of a sweep; explicit values replace the grid's, the rest come from :data:`GRIDS`
    (``preset`` ``grid``: :data:`GRID_PRESET`'s values first).

    Raises SystemExit naming the dataset when a value is needed from a grid that does not list it.
    """
    if not has_grid(trainer, setup):
        return []
    explicit = {"lambda1": lambda1, "lambda2": lambda2, "ratios": ratios}
    grid = GRIDS[(trainer, setup)].get(dataset)
    if grid is not None and preset == "grid":
        grid = {**grid, **GRID_PRESET.get((trainer, setup), {}).get(dataset, {})}
    if grid is None and (any(v is None for v in explicit.values()) or gen_step is None):
        raise SystemExit(f"error: no official {trainer} grid for dataset {dataset!r} in Setup-{'I' * setup} "
                         f"(known: {', '.join(GRIDS[(trainer, setup)])}); pass --lambda1, --lambda2, --ratios and "
                         f"--gen-step")
    vals = {k: (v if v is not None else grid[k]) for k, v in explicit.items()}
    if gen_step is None:
        table = grid["gen_step"]
        gen_step = table.get(f"shots{shots}", table.get(cfg, table.get("default", 1)))
    return [Setting(l1, l2, r, rt, int(gen_step))
            for l1, l2, (r, rt) in itertools.product(vals["lambda1"], vals["lambda2"], vals["ratios"])]


def selected(trainer: str, setup: int, dataset: str, cfg: str) -> Optional[Setting]:
    """The model the official open-set scripts evaluate for (dataset, cfg), if there is one."""
    return protocol(trainer, setup).selected.get(dataset, {}).get(cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Print the official overrides of a trainer (KEY VALUE ...)")
    p.add_argument("trainer")
    p.add_argument("setup", type=int, choices=[1, 2])
    p.add_argument("--cfg", default="", help="trainer config name: adds its epochs / batch sizes / LR")
    p.add_argument("--eval", action="store_true", help="evaluation-run overrides (adds e.g. CRoFT's test ratios)")
    args = p.parse_args(argv)
    if (args.trainer, args.setup) not in OFFICIAL:
        print(f"error: no official table for trainer {args.trainer!r} in Setup-{'I' * args.setup} (known: "
              f"{', '.join(sorted({t for t, _ in OFFICIAL}))})", file=sys.stderr)
        return 2
    prot = OFFICIAL[(args.trainer, args.setup)]
    print(" ".join(prot.test_opts(args.cfg) if args.eval else prot.train_opts(args.cfg)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
