"""``build_optimizer(model, cfg.OPTIM)``: sgd / adam / adamw over the trainable parameters."""
from __future__ import annotations

from typing import Any, Iterable, Union

import torch
import torch.nn as nn

from ..utils.errors import ConfigError

AVAI_OPTIMS = ("sgd", "adam", "adamw")


def build_optimizer(model: Union[nn.Module, Iterable[Any]], optim_cfg: Any,
                    param_groups: Any = None) -> torch.optim.Optimizer:
    """Build the optimiser named ``optim_cfg.NAME`` for ``model`` (a module or an iterable of parameters)."""
    name = optim_cfg.NAME.lower()
    if name not in AVAI_OPTIMS:
        raise ConfigError(f"unknown OPTIM.NAME {optim_cfg.NAME!r} (available: {', '.join(AVAI_OPTIMS)})")
    if param_groups is not None:
        params = param_groups
    elif isinstance(model, nn.Module):
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model)
    lr, wd = optim_cfg.LR, optim_cfg.WEIGHT_DECAY
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim_cfg.MOMENTUM, weight_decay=wd,
                               dampening=optim_cfg.SGD_DAMPNING, nesterov=optim_cfg.SGD_NESTEROV)
    betas = (optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=betas)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas)
