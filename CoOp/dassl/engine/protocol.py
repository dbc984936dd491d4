"""The ``protocol`` block of a run record: which plan ran, which named switches were official or fixed, and the
FPR95 convention of each detection score.

A switch is a config key whose official value reproduces the official code and whose other values are named
deviations (README "Fidelity and named fixes"). Keys absent from a run's config (another trainer's node) are
left out.
"""
from __future__ import annotations

from typing import Any, Optional

from ..evaluation.ood import FPR95_CONVENTION

# key -> official value
SWITCHES: dict[str, Any] = {
    "TRAINER.CRoFT.FIX_EDR_CONSISTENT": False,
    "TRAINER.CRoFT.FIX_SEPARATE_UPDATES": False,
    "TRAINER.CRoFT.FIX_FRESH_ACTIVATIONS": False,
    "TRAINER.CRoFT.FIX_EDR_TEMPERATURE": False,
    "TRAINER.TIP_ADAPTER.CACHE_MODE": "official",
    "TRAINER.TIP_ADAPTER.CLIP_LOGIT_SCALE": False,
    "TRAINER.DPLCLIP.LOGITS": "concat",
    "TRAINER.DPLCLIP.DOMAIN_POOL": "mean_of_mlp",
    "TRAINER.DPLCLIP.TEST_GROUP_BY_DOMAIN": True,
    "TRAINER.COOP.FP32_PARAMS": False,
    "TRAINER.COCOOP.FP32_PARAMS": False,
    "TRAINER.DPLCLIP.FP32_PARAMS": False,
    "TRAINER.BCAL.FP32_PARAMS": False,
    "TRAINER.BCAL.IRM_REDUCTION": "sum",
    "TRAINER.BCAL.ALIGN_GRAD": False,
    "TRAINER.BCAL.KL_PRIOR": "init",
    "TRAINER.BCAL.EVAL_NOISE": True,
    "DATALOADER.OOD_TEST.TRANSFORM": "train",
    "OPTIM.WEIGHT_DECAY": 0.1,
    "DATASET.FEWSHOT_SAMPLER": "official",
    "DATASET.DOMAIN_MATCH": "substring",
    "DATASET.SETUP1_OOD_SAMPLE": "shared_cache",
    "DATASET.OPENSET_DRAW_ORDER": "official",
    "FEATURE_CACHE.ENABLED": False,
    "MODEL.BACKBONE.LOCAL_FEATURES": "value",
    "TEST.OOD_ID_CORRECT_ONLY": True,
    "TEST.KNN_ID_CORRECT_ONLY": False,
}


def _lookup(cfg: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def protocol_block(cfg: dict[str, Any], dataset: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``{"preset", "switches": {key: value}, "fixed": [keys off their official value], "fpr95_convention",
    "dataset"}`` (``dataset``: what the dataset reports about its sampling, e.g. the Setup-I open-set sample)."""
    switches, fixed = {}, []
    for key, official in SWITCHES.items():
        found, value = _lookup(cfg, key)
        if not found:
            continue
        switches[key] = value
        same = abs(float(value) - float(official)) < 1e-12 if isinstance(official, float) else value == official
        if not same:
            fixed.append(key)
    preset = _lookup(cfg, "PROTOCOL.PRESET")[1] or "manual"
    return {"preset": preset, "switches": switches, "fixed": fixed, "fpr95_convention": dict(FPR95_CONVENTION),
            "dataset": dict(dataset or {})}
