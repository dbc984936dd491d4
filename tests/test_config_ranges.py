"""Config value ranges: every numeric key has one; each is checked with an accepted and a refused value.

The TABLE is written from the spec and the meaning of each key (not imported from the code): residual ratios
ρ, ρ_t and CLIP-Adapter's ratio mix two features (``ρ·adapter + (1-ρ)·original``, spec 1.2/3), so they live in
[0, 1]; loss weights λ are >= 0; learning rates are > 0 and finite; epochs, batch sizes and shots are counts.
"""
from __future__ import annotations

import math
import os

import pytest
from yacs.config import CfgNode as CN

from helpers import COOP

# key -> (accepted values, refused values)
TABLE = {
    "VERSION": ([1], [0]),
    "SEED": ([-1, 0, 7], [1.5]),
    "DEVICE": (["auto", "cpu", "cuda", "cuda:1"], ["gpu", "cuda:x", ""]),
    "INPUT.SIZE": ([(224, 224), (32, 32)], [(0, 224), (224, -1)]),
    "INPUT.PIXEL_MEAN": ([[0.5, 0.5, 0.5]], [[0.5, 1.5, 0.5]]),
    "INPUT.PIXEL_STD": ([[0.2, 0.2, 0.2]], [[0.2, 0.0, 0.2]]),
    "INPUT.CROP_PADDING": ([0, 4], [-1]),
    "INPUT.RRCROP_SCALE": ([(0.08, 1.0)], [(0.0, 1.0), (0.5, 1.5)]),
    "DATASET.NUM_SHOTS": ([-1, 1, 16], [-2, 2.5]),
    "DATASET.ID_PER_CLASS_CAP": ([-1, 0, 500], [-2]),
    "DATASET.SETUP1_OOD_SIZE": ([-1, 1000], [-3]),
    "DATASET.OOD_PER_CLASS_CAP": ([-1, 100], [-2]),
    "DATALOADER.NUM_WORKERS": ([0, 8], [-1]),
    "DATALOADER.TRAIN_X.BATCH_SIZE": ([1, 32], [0, -4]),
    "DATALOADER.TEST.BATCH_SIZE": ([1, 100], [0]),
    "FEATURE_CACHE.TRAIN_VIEWS": ([1, 10], [0]),
    "OPTIM.LR": ([2e-3, 1.0], [0.0, -1e-3, math.inf, math.nan]),
    "OPTIM.WEIGHT_DECAY": ([0.0, 0.1], [-0.1]),
    "OPTIM.MOMENTUM": ([0.0, 0.9], [1.5, -0.1]),
    "OPTIM.SGD_DAMPNING": ([0.0], [-0.5]),
    "OPTIM.ADAM_BETA1": ([0.0, 0.9], [1.0]),
    "OPTIM.ADAM_BETA2": ([0.999], [1.0, -0.1]),
    "OPTIM.STEPSIZE": ([(-1,), (10, 20)], [(-5,)]),
    "OPTIM.GAMMA": ([0.1, 1.0], [0.0, 2.0]),
    "OPTIM.MAX_EPOCH": ([1, 30], [0, -3]),
    "OPTIM.WARMUP_EPOCH": ([-1, 0, 1], [-2]),
    "OPTIM.WARMUP_CONS_LR": ([0.0, 1e-5], [-1e-5]),
    "OPTIM.WARMUP_MIN_LR": ([1e-5], [-1.0]),
    "TRAIN.CHECKPOINT_FREQ": ([0, 1], [-1]),
    "TRAIN.PRINT_FREQ": ([1, 10], [0]),
    "TEST.KNN_K": ([1, 50], [0]),
    "TEST.MCM_TEMPERATURE": ([1.0, 0.5], [0.0, -1.0]),
    "MODEL.BACKBONE.LOCAL_FEATURES": (["value", "tokens"], ["patch", ""]),
    # OpenOOD: GEN's exponent gamma > 0 and top-M count; ViM / Residual principal dimensions are counts
    "TEST.GEN_GAMMA": ([0.1, 2.0], [0.0, -0.1]),
    "TEST.GEN_M": ([1, 100], [0]),
    "TEST.VIM_DIM": ([1, 256], [0, 2.5]),
    "TEST.RESIDUAL_DIM": ([512], [-1]),
    # CRoFT (spec 1.2: residual ratios; 1.5: λ1 / λ2 loss weights; 1.6: gen_step generator steps)
    "TRAINER.CRoFT.ratio": ([0.0, 0.2, 1.0], [7.0, -0.1, 1.01]),
    "TRAINER.CRoFT.ratio_text": ([0.5], [1.5, -1.0]),
    "TRAINER.CRoFT.lambda1": ([0.0, 15.0], [-1.0]),
    "TRAINER.CRoFT.lambda2": ([0.0, 1000.0], [-5.0]),
    "TRAINER.CRoFT.gen_step": ([0, 1, 5], [-1]),
    "TRAINER.CRoFT.PREC": (["fp32", "fp16", "amp", "bf16"], ["fp8", "float32"]),
    "TRAINER.ZSCLIP.PREC": (["fp16", "fp32"], ["fp12"]),
    # CoOp / CoCoOp: context length (ignored when CTX_INIT is set)
    "TRAINER.COOP.N_CTX": ([16, 4], [-1]),
    "TRAINER.COOP.PREC": (["fp16"], ["half"]),
    # LoCoOp: context length as CoOp; λ weights a loss (>= 0); K counts classes (0: K from the ratio); the ratio is a
    # fraction of the classes
    "TRAINER.LOCOOP.N_CTX": ([16, 4], [-1]),
    "TRAINER.LOCOOP.PREC": (["fp16", "fp32"], ["fp8"]),
    "TRAINER.LOCOOP.LAMBDA": ([0.0, 0.25], [-0.25]),
    "TRAINER.LOCOOP.TOPK": ([0, 200], [-1, 2.5]),
    "TRAINER.LOCOOP.TOPK_RATIO": ([0.0, 0.2, 1.0], [1.5, -0.2]),
    "TRAINER.COCOOP.N_CTX": ([16], [-2]),
    "TRAINER.COCOOP.PREC": (["fp32"], ["fp64"]),
    # CLIP-Adapter: residual ratio and bottleneck reduction
    "TRAINER.CLIP_ADAPTER.RATIO": ([0.2, 1.0], [1.2, -0.2]),
    "TRAINER.CLIP_ADAPTER.REDUCTION": ([4, 1], [0]),
    "TRAINER.CLIP_ADAPTER.PREC": (["fp32"], ["x"]),
    # Tip-Adapter-F: α residual weight, β sharpness (both >= 0), augmented passes
    "TRAINER.TIP_ADAPTER.ALPHA": ([1.0, 0.0], [-1.0]),
    "TRAINER.TIP_ADAPTER.BETA": ([1.0, 10.0], [-0.5]),
    "TRAINER.TIP_ADAPTER.AUGMENT_EPOCH": ([1, 10], [0]),
    "TRAINER.TIP_ADAPTER.PREC": (["fp16"], ["int8"]),
    # DPLCLIP: domain tokens, MLP depth (input + output layer at least), width, dropout probability
    "TRAINER.DPLCLIP.N_CTX": ([16, 1], [0]),
    "TRAINER.DPLCLIP.PREC": (["bf16"], ["fp"]),
    "TRAINER.DPLCLIP.MLP_DEPTH": ([2, 3], [1]),
    "TRAINER.DPLCLIP.MLP_WIDTH": ([512, 1], [0]),
    "TRAINER.DPLCLIP.MLP_DROPOUT": ([0.0, 0.1], [1.0, -0.1]),
    "TRAINER.DPLCLIP.DOMAIN_POOL": (["mean_of_mlp", "mlp_of_mean"], ["mean"]),  # official and the named fix
    "TRAINER.DPLCLIP.LOGITS": (["concat", "per_group"], ["group"]),
    # Bayes-CAL: loss weights >= 0, initial sigma > 0
    "TRAINER.BCAL.N_CTX": ([16], [-1]),
    "TRAINER.BCAL.PREC": (["amp"], ["fp4"]),
    "TRAINER.BCAL.ALPHA1": ([0.01, 0.0], [-0.01]),
    "TRAINER.BCAL.ALPHA2": ([0.5], [-0.5]),
    "TRAINER.BCAL.ALPHA3": ([0.01], [-1.0]),
    "TRAINER.BCAL.KL_SCALE": ([1e-8, 0.0], [-1e-8]),
    "TRAINER.BCAL.SIGMA_INIT": ([1e-5], [0.0, -1e-5]),
    "TRAINER.BCAL.IRM_REDUCTION": (["sum", "mean"], ["max"]),  # official sum, named fix mean
    "TRAINER.BCAL.KL_PRIOR": (["init", "standard"], ["normal"]),
}


def _leaves(node: CN, prefix: str = ""):
    for k, v in node.items():
        if isinstance(v, CN):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _numeric(v) -> bool:
    if isinstance(v, (list, tuple)):
        return bool(v) and all(_numeric(x) for x in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _trainers():
    import trainers  # noqa: F401
    from dassl.engine import TRAINER_REGISTRY

    return {n: TRAINER_REGISTRY.get(n) for n in TRAINER_REGISTRY.registered_names()
            if n != "TestProbe" and hasattr(TRAINER_REGISTRY.get(n), "extend_cfg")}


def _trainer_numeric_keys(cls) -> set[str]:
    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    cls.extend_cfg(cfg)
    return {k for k, v in _leaves(cfg.TRAINER, "TRAINER.") if _numeric(v) or k.endswith(".PREC")}


def test_every_engine_numeric_key_has_a_range_and_a_table_row():
    from dassl.config import get_cfg_default
    from dassl.config.validate import ENGINE_RANGES

    numeric = {k for k, v in _leaves(get_cfg_default()) if _numeric(v)}
    assert numeric - set(ENGINE_RANGES) == set(), "engine keys without a range in ENGINE_RANGES"
    assert numeric - set(TABLE) == set(), "engine keys without a row in this test's TABLE"


@pytest.mark.parametrize("name", sorted(_trainers()))
def test_every_trainer_numeric_key_has_a_range_and_a_table_row(name):
    cls = _trainers()[name]
    keys = _trainer_numeric_keys(cls)
    declared = set(getattr(cls, "CFG_RANGES", {}))
    assert keys - declared == set(), f"{name}: numeric / precision keys without a range in {name}.CFG_RANGES"
    assert keys - set(TABLE) == set(), f"{name}: keys without a row in this test's TABLE"


def _cfg_for(key: str):
    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    for cls in _trainers().values():
        cls.extend_cfg(cfg)
    if key.startswith("TRAINER."):
        node = key.split(".")[1]
        cfg.TRAINER.NAME = next(n for n, c in _trainers().items() if any(k.startswith(f"TRAINER.{node}.")
                                                                        for k in getattr(c, "CFG_RANGES", {})))
    return cfg


def _set(cfg, key, value):
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value


@pytest.mark.parametrize("key", sorted(TABLE))
def test_range_accepts_and_refuses(key):
    from dassl.config.validate import validate_cfg
    from dassl.utils.errors import ConfigError

    good, bad = TABLE[key]
    for value in good:
        cfg = _cfg_for(key)
        _set(cfg, key, value)
        validate_cfg(cfg)
    for value in bad:
        cfg = _cfg_for(key)
        _set(cfg, key, value)
        with pytest.raises(ConfigError) as err:
            validate_cfg(cfg)
        msg = str(err.value)
        assert msg.startswith(f"{key} = ") and "expected" in msg and "\n" not in msg, msg


def test_shipped_configs_are_in_range():
    """Every trainer yaml merged onto the defaults (and each dataset yaml) passes the range checks."""
    from dassl.config import get_cfg_default
    from dassl.config.validate import validate_cfg

    trainers = _trainers()
    base = os.path.join(COOP, "configs")
    datasets_cfg = sorted(os.listdir(os.path.join(base, "datasets")))
    checked = 0
    for name in sorted(os.listdir(os.path.join(base, "trainers"))):
        if name not in trainers:
            continue
        for f in sorted(os.listdir(os.path.join(base, "trainers", name))):
            for d in datasets_cfg:
                cfg = get_cfg_default()
                for cls in trainers.values():
                    cls.extend_cfg(cfg)
                cfg.merge_from_file(os.path.join(base, "datasets", d))
                cfg.merge_from_file(os.path.join(base, "trainers", name, f))
                cfg.TRAINER.NAME = name
                validate_cfg(cfg)
                checked += 1
    assert checked > 20
