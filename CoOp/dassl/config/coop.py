"""Config keys that CoOp-family configs, scripts and trainer files rely on (upstream ``train.py``'s
``extend_cfg`` and Dassl's defaults), added when missing so their files merge and run unmodified.

``COMPAT_KEYS`` lists every key kept for Dassl/CoOp compatibility only (a dead-key check must skip them);
a trainer registered by this project may replace its ``TRAINER.<NAME>`` node with its own (e.g. CoOp's).
"""
from __future__ import annotations

from typing import Any

from yacs.config import CfgNode as CN

# key -> upstream default
COMPAT_DEFAULTS: dict[str, Any] = {
    "TRAINER.COOP.N_CTX": 16,                    # number of context vectors
    "TRAINER.COOP.CSC": False,                   # class-specific context
    "TRAINER.COOP.CTX_INIT": "",                 # initialization words
    "TRAINER.COOP.PREC": "fp16",                 # fp16, fp32, amp
    "TRAINER.COOP.CLASS_TOKEN_POSITION": "end",  # middle, end or front
    "TRAINER.COCOOP.N_CTX": 16,
    "TRAINER.COCOOP.CTX_INIT": "",
    "TRAINER.COCOOP.PREC": "fp16",
    "DATASET.SUBSAMPLE_CLASSES": "all",          # all, base or new (CoOp's base-to-new split)
    "MODEL.INIT_WEIGHTS": "",                    # CoOp: load_pretrained_weights(prompt_learner, ...); read by
                                                 # the prompt trainers, refused by the others (train.py)
    "USE_CUDA": True,                            # read by upstream train.py; DEVICE decides here
}
COMPAT_KEYS: tuple[str, ...] = tuple(COMPAT_DEFAULTS)


def add_coop_config(cfg: CN) -> None:
    """Add each compatibility key that ``cfg`` lacks, with the upstream default (existing keys are kept)."""
    for key, value in COMPAT_DEFAULTS.items():
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node:
                node[part] = CN()
            node = node[part]
        if parts[-1] not in node:
            node[parts[-1]] = value
