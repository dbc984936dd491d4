"""Vectorised CRoFT λ-sweep: the members of a stack (``train.py --member``) as K x D x D adapter/generator weights.

The members differ only in ``lambda1``/``lambda2`` (``CRoFT.STACK_KEYS``); the batch, its features, the text
features and the learning rate are shared, so one :func:`croft_train_step` on stacked weights with per-member
λ vectors is K separate steps at once (the runs' parameters are disjoint and SGD/Adam act element-wise). The
members' own modules, optimisers and schedulers stay the source of truth between epochs: :meth:`sync` copies
each member's slice of the weights and of the optimiser state back, so checkpoints are those of separate runs.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from dassl.optim import build_optimizer

from .croft_core import Adapter, OODImgGen, croft_train_step


def _member_state(value: Any, stacked: torch.Tensor, k: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[k].clone() if value.shape == stacked.shape else value.clone()
    return value


class CRoFTStack:
    """K CRoFT trainers trained as one: stacked weights, one step per batch, per-member loss summaries."""

    def __init__(self, trainers: list[Any]) -> None:
        self.members = trainers
        lead = trainers[0]
        for t in trainers[1:]:
            if not torch.equal(t.text_feats, lead.text_feats):
                raise RuntimeError("stacked CRoFT members must share their text features")
        k, dim = len(trainers), lead.text_feats.shape[1]
        self.adapter = Adapter(dim, device=lead.device, stack=k)
        self.generator = OODImgGen(dim, device=lead.device, stack=k)
        self.optim = build_optimizer(self.adapter, lead.cfg.OPTIM)
        self.optim_gen = build_optimizer(self.generator, lead.cfg.OPTIM)
        lam = {name: torch.tensor([float(getattr(t.opts, name)) for t in trainers], device=lead.device)
               for name in ("lambda1", "lambda2")}
        self.opts = dataclasses.replace(lead.opts, **lam)
        self.load()

    def pairs(self) -> list[tuple[torch.optim.Optimizer, str, torch.Tensor, list[Any]]]:
        """(stacked optimiser, member optimiser attribute, stacked parameter, member parameters)."""
        ms = self.members
        return [(self.optim, "optim", self.adapter.fc_i, [t.adapter.fc_i for t in ms]),
                (self.optim, "optim", self.adapter.fc_t, [t.adapter.fc_t for t in ms]),
                (self.optim_gen, "optim_gen", self.generator.img2img_cov, [t.generator.img2img_cov for t in ms])]

    @torch.no_grad()
    def load(self) -> None:
        """Stack the members' current weights and optimiser states (fresh or resumed)."""
        for opt, attr, stacked, params in self.pairs():
            stacked.copy_(torch.stack([p.detach() for p in params]))
            states = [getattr(t, attr).state.get(p) for t, p in zip(self.members, params)]
            if all(states):
                opt.state[stacked] = {key: (torch.stack([st[key] for st in states])
                                            if isinstance(v, torch.Tensor) and v.shape == params[0].shape
                                            else (v.clone() if isinstance(v, torch.Tensor) else v))
                                      for key, v in states[0].items()}

    @torch.no_grad()
    def sync(self) -> None:
        """Give every member its slice of the weights and of the optimiser state."""
        for opt, attr, stacked, params in self.pairs():
            state = opt.state.get(stacked)
            for k, (t, p) in enumerate(zip(self.members, params)):
                p.copy_(stacked[k])
                if state:
                    getattr(t, attr).state[p] = {key: _member_state(v, stacked, k) for key, v in state.items()}

    def step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, float]]:
        """One vectorised training step; at the epoch's last batch every member's schedulers step."""
        lead = self.members[0]
        image, label = lead.parse_batch_train(batch)
        feats = lead.encode_images(image, batch).float()
        for opt, member_opt in ((self.optim, lead.optim), (self.optim_gen, lead.optim_gen)):
            for group, member_group in zip(opt.param_groups, member_opt.param_groups):
                group["lr"] = member_group["lr"]  # the members' schedulers set the (common) learning rate
        stats = croft_train_step(self.adapter, self.generator, feats, lead.text_feats, label, self.optim,
                                 self.optim_gen, self.opts, lead.logit_scale)
        if batch_idx + 1 == lead.num_batches:
            with warnings.catch_warnings():  # the members' optimisers did not step themselves: the stack did
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                for t in self.members:
                    t.update_lr()
        out = []
        for k in range(len(self.members)):
            summary = {"loss": stats["loss"][k], "acc": stats["acc"][k], "ce": stats["ce"][k],
                       "edr_L2": stats["L2"][k]}
            if stats["gen_loss"]:
                summary["gen"] = float(sum(g[k] for g in stats["gen_loss"]) / len(stats["gen_loss"]))
            out.append(summary)
        return out
