"""``CRoFT`` trainer: frozen CLIP + identity-initialised image/text adapters + OOD feature generator + EDR.

The maths lives in :mod:`trainers.croft_core` (golden-tested against the official code); this file wires it to
the engine: config keys, CLIP loading, text features (computed once, not checkpointed), two optimisers and
schedulers registered as ``clip_adapter`` and ``generator``, and inference returning
``InferenceOutput(logits, features=X_hat, score, extras={"img_zs": X_zs})`` (the official ``CustomCLIP``
returns ``[logits, X_hat, T_hat, X_zs, T_zs, score]``; the per-class ``T_hat``/``T_zs`` are not per-image).
When a score reads local logits (``gl_mcm``, ``l_mcm``; not in the official code), each local feature goes through
the image adapter exactly as the global feature does, ``n(ρ·L W_iᵀ + (1 − ρ)·L)``, and is scored against the
adapted text features: ``local_logits = s · L̂ T̂ᵀ`` (:meth:`CRoFT.local_logits`).

Dataset semantics (the official code switched on dataset-name substrings) live in one table here,
:data:`SEMANTICS` / :data:`DATASET_SEMANTICS`, chosen by the one key ``TRAINER.CRoFT.SEMANTICS`` (``auto``:
by ``DATASET.NAME``, the official behaviour).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from yacs.config import CfgNode as CN

from dassl.config.validate import PREC, count, nonneg, unit
from dassl.engine import TRAINER_REGISTRY, TrainerX
from dassl.optim import build_lr_scheduler, build_optimizer
from dassl.utils.errors import ConfigError
from dassl.engine.inference import InferenceOutput

from .clip_common import setup_frozen_clip, single_template, text_features
from .croft_core import Adapter, CRoFTOptions, OODImgGen, croft_train_step, forward



class Semantics(NamedTuple):
    """What the official code decided from the dataset name."""

    text_prompts: str        # "single" (dataset template) | "ensemble7" (7 ImageNet templates)
    edr_reduction: str       # see croft_core.EDR_REDUCTIONS
    edr_use_generated: bool  # False: EDR never sees generated features (branch B)


SEMANTICS = {
    "setup2": Semantics("single", "mean_sumsq", True),
    "setup2_vlcs": Semantics("single", "mean_sumsq", False),  # official VLCS: forced to EDR branch B
    "setup1": Semantics("ensemble7", "sum_meansq", True),     # official "ImageNet" in the dataset name
}
# DATASET.NAME -> row of SEMANTICS under SEMANTICS "auto"; every other dataset: "setup2"
DATASET_SEMANTICS = {
    **{name: "setup2_vlcs" for name in ("VLCS", "VLCS_DTD", "VLCS_Food101", "VLCS_Caltech101")},
    "ImageNet46": "setup1", "ImageNetOOD46": "setup1",
}


def dataset_semantics(cfg: Any) -> tuple[str, Semantics]:
    """The semantics row a config selects (``TRAINER.CRoFT.SEMANTICS``; ``auto`` looks up ``DATASET.NAME``)."""
    name = cfg.TRAINER.CRoFT.SEMANTICS
    if name == "auto":
        name = DATASET_SEMANTICS.get(cfg.DATASET.NAME, "setup2")
    if name not in SEMANTICS:
        raise ConfigError(f"TRAINER.CRoFT.SEMANTICS must be auto or one of {sorted(SEMANTICS)}, got {name!r}")
    return name, SEMANTICS[name]


@TRAINER_REGISTRY.register()
class CRoFT(TrainerX):
    """Concurrent optimisation for OOD generalisation and open-set OOD detection (Zhu et al., ICML 2024)."""

    cfg_node = "CRoFT"  # the TRAINER.<node> this trainer reads
    LOCAL_FEATURES = True  # local logits (through the image adapter) for gl_mcm / l_mcm
    STACK_KEYS = ("TRAINER.CRoFT.lambda1", "TRAINER.CRoFT.lambda2")  # train.py --member: one vectorised λ-sweep

    @classmethod
    def make_stack(cls, trainers: list["CRoFT"]) -> Any:
        """The members of a λ-sweep as one vectorised run (:mod:`trainers.croft_stack`)."""
        from .croft_stack import CRoFTStack

        return CRoFTStack(trainers)

    CFG_RANGES = {"TRAINER.CRoFT.PREC": PREC, "TRAINER.CRoFT.ratio": unit("image residual ratio"),
                  "TRAINER.CRoFT.ratio_text": unit("text residual ratio"), "TRAINER.CRoFT.lambda1": nonneg(),
                  "TRAINER.CRoFT.lambda2": nonneg(), "TRAINER.CRoFT.gen_step": count(0)}

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        c = cfg.TRAINER.CRoFT = CN()
        c.PREC = "fp32"            # precision of the frozen image encoder; the adapters always run in fp32
        c.ratio = 0.2              # image residual ratio rho
        c.ratio_text = 0.5         # text residual ratio rho_t
        c.lambda1 = 1.0
        c.lambda2 = 5.0
        c.WCCF = True              # generator + worst-case covariate-shift losses on
        c.gen_step = 1
        c.SEMANTICS = "auto"       # dataset semantics row: auto (by DATASET.NAME, official) | setup2 | setup2_vlcs | setup1
        # Named fixes (all off = official behaviour; see the README)
        c.FIX_EDR_CONSISTENT = False
        c.FIX_SEPARATE_UPDATES = False
        c.FIX_FRESH_ACTIVATIONS = False
        c.FIX_EDR_TEMPERATURE = False

    def check_cfg(self, cfg: Any) -> None:
        dataset_semantics(cfg)

    @staticmethod
    def dataset_signature(cfg: Any) -> tuple[str, str]:
        """What the model build derives from ``DATASET.NAME`` (semantics row, prompt template): runs of one
        evaluation pass (``train.py --eval-open-set``) must agree on it."""
        return dataset_semantics(cfg)[0], single_template(cfg)

    def croft_options(self) -> CRoFTOptions:
        c = self.cfg.TRAINER.CRoFT
        sem = dataset_semantics(self.cfg)[1]
        branch = "A" if (c.WCCF and c.gen_step > 0 and sem.edr_use_generated) else "B"
        return CRoFTOptions(ratio=c.ratio, ratio_text=c.ratio_text, lambda1=c.lambda1, lambda2=c.lambda2,
                            gen_step=c.gen_step, wccf=c.WCCF, edr_branch=branch, edr_reduction=sem.edr_reduction,
                            fix_edr_consistent=c.FIX_EDR_CONSISTENT, fix_separate_updates=c.FIX_SEPARATE_UPDATES,
                            fix_fresh_activations=c.FIX_FRESH_ACTIVATIONS,
                            fix_edr_temperature=c.FIX_EDR_TEMPERATURE)

    def build_model(self) -> None:
        cfg = self.cfg
        c = cfg.TRAINER.CRoFT
        bundle, _ = setup_frozen_clip(self, c.PREC)
        classnames = self.dm.dataset.classnames
        tpl = single_template(cfg)
        sem_name, sem = dataset_semantics(cfg)
        print(f"CRoFT dataset semantics: {sem_name} {sem._asdict()}")
        print(f"Text features: {sem.text_prompts} "
              f"({'7 templates' if sem.text_prompts == 'ensemble7' else repr(tpl)})")
        self.text_feats = text_features(bundle, classnames, sem.text_prompts, tpl, self.device).float()
        dim = self.text_feats.shape[1]
        self.opts = self.croft_options()
        print(f"CRoFT: EDR branch {self.opts.effective_branch}, reduction {self.opts.edr_reduction}, "
              f"fixes: {[k for k in ('FIX_EDR_CONSISTENT', 'FIX_SEPARATE_UPDATES', 'FIX_FRESH_ACTIVATIONS', 'FIX_EDR_TEMPERATURE') if c[k]] or 'none'}")
        self.adapter = Adapter(dim).to(self.device)
        self.generator = OODImgGen(dim).to(self.device)
        self.optim = build_optimizer(self.adapter, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("clip_adapter", self.adapter, self.optim, self.sched)
        self.optim_gen = build_optimizer(self.generator, cfg.OPTIM)
        self.sched_gen = build_lr_scheduler(self.optim_gen, cfg.OPTIM)
        self.register_model("generator", self.generator, self.optim_gen, self.sched_gen)

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        image, label = self.parse_batch_train(batch)
        feats = self.encode_images(image, batch).float()
        stats = croft_train_step(self.adapter, self.generator, feats, self.text_feats, label, self.optim,
                                 self.optim_gen, self.opts, self.logit_scale)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        out = {"loss": stats["loss"], "acc": stats["acc"], "ce": stats["ce"], "edr_L2": stats["L2"]}
        if stats["gen_loss"]:
            out["gen"] = float(sum(stats["gen_loss"]) / len(stats["gen_loss"]))
        return out

    def model_inference(self, input: torch.Tensor) -> InferenceOutput:
        local = None
        if self.infer_local:
            feats, local = self.encode_images_local(input)
        else:
            feats = self.encode_images(input)
        out = forward(self.adapter, feats.float(), self.text_feats, self.opts, self.logit_scale)
        return InferenceOutput(logits=out.logits, features=out.img_feat, score=out.score,
                               extras={"img_zs": out.img_zs},
                               local_logits=None if local is None else self.local_logits(local.float(), out.txt_feat))

    def local_logits(self, local: torch.Tensor, txt_feat: torch.Tensor) -> torch.Tensor:
        """``(N, R, C)`` logits of local features ``(N, R, D)``: each region through the image adapter as the
        global feature (``n(ρ·L W_iᵀ + (1 − ρ)·L)``), then ``s ·`` (adapted region) ``@ T̂ᵀ`` (``txt_feat``)."""
        n, r, d = local.shape
        regions, _ = self.adapter(local.reshape(n * r, d), self.text_feats, self.opts.ratio, self.opts.ratio_text,
                                  self.opts.norm_eps)
        return ((self.logit_scale * regions) @ txt_feat.t()).view(n, r, -1)
