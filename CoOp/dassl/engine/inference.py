"""The one contract between a trainer's ``model_inference`` and the evaluator: :class:`InferenceOutput`.

``model_inference(input)`` returns an :class:`InferenceOutput` (or, Dassl-style, the bare logits tensor). The
evaluator reads fields by name, never positions; a trainer that sets no ``score`` gets the energy
``logsumexp(logits)`` of its logits (the official detection score). A positional list is refused.

Local logits are asked for per pass (``trainer.infer_local``) and reduced per batch as they are collected
(:func:`local_reduction`): only per-image numbers outlive a batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..evaluation.scores import ScoreInputs, reduce_local, score_names, score_needs

__all__ = ["InferenceOutput", "as_inference_output", "score_settings", "local_reduction"]


@dataclass
class InferenceOutput:
    """What one inference batch produced; every tensor has the batch size ``N`` as its first dimension.

    Attributes:
        logits: ``(N, C)`` class logits (CLIP scale ``s * cos``); classes a trainer pads use ``-inf``.
        features: ``(N, D)`` image features for feature-based scores (KNN), or None.
        score: ``(N,)`` the trainer's own detection score (higher = more ID); None means the energy of the logits,
            in the logits' dtype when that is float64, else in float32 (fp16/bf16 logits are upcast).
        extras: further per-image tensors by name (saved as ``extra_<name>``; readable by scores).
        local_logits: ``(N, R, C)`` logits of each image's R local regions against the same classes and at the
            same scale as ``logits`` (scores ``gl_mcm``, ``l_mcm``), or None. Trainers set it only when asked
            (``SimpleTrainer.infer_local``); the evaluator reduces it per batch (:func:`local_reduction`) and
            keeps only the per-image results (``local_<score>`` in ``scores.npz``).
    """

    logits: torch.Tensor
    features: Optional[torch.Tensor] = None
    score: Optional[torch.Tensor] = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    local_logits: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if not isinstance(self.logits, torch.Tensor) or self.logits.dim() != 2:
            raise TypeError(f"InferenceOutput.logits must be an (N, C) tensor, got {_describe(self.logits)}")
        n = self.logits.shape[0]
        if self.score is None:
            x = self.logits.detach()
            self.score = torch.logsumexp(x if x.dtype == torch.float64 else x.float(), dim=1)
        for name, value, dims in (("features", self.features, 2), ("score", self.score, 1),
                                  ("local_logits", self.local_logits, 3),
                                  *((f"extras[{k!r}]", v, None) for k, v in self.extras.items())):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != n \
                    or (dims is not None and value.dim() != dims):
                raise TypeError(f"InferenceOutput.{name} must be a tensor with {n} rows"
                                f"{'' if dims is None else f' and {dims} dims'}, got {_describe(value)}")


def _describe(x: Any) -> str:
    return f"tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def as_inference_output(out: Any, who: str = "model_inference") -> InferenceOutput:
    """``out`` as an :class:`InferenceOutput`: a bare logits tensor is wrapped; a list/tuple is refused."""
    if isinstance(out, InferenceOutput):
        return out
    if isinstance(out, torch.Tensor):
        return InferenceOutput(logits=out)
    raise TypeError(f"{who} returned a {type(out).__name__}; return dassl.engine.inference.InferenceOutput("
                    f"logits=..., features=..., score=..., extras={{...}}) or the logits tensor (positional lists "
                    f"are ambiguous and no longer accepted)")


def score_settings(trainer: Any, cfg: Any) -> dict[str, Any]:
    """The settings of a run's :class:`ScoreInputs`: the model's logit scale and the score keys of ``cfg.TEST``."""
    t = cfg.TEST
    return dict(logit_scale=trainer.logit_scale_value(), mcm_temperature=t.MCM_TEMPERATURE, gen_gamma=t.GEN_GAMMA,
                gen_m=t.GEN_M, vim_dim=t.VIM_DIM, residual_dim=t.RESIDUAL_DIM)


def local_reduction(trainer: Any) -> Optional[Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    """``fn(local_logits (B, R, C)) -> {"local_<score>": (B,)}`` for the ``TEST.OOD_SCORES`` entries of
    ``trainer.cfg`` that read local logits (their ``reduce_local``, :func:`dassl.evaluation.scores.reduce_local`,
    on the batch's float32 CPU copy); None when there is none or the run computes no local features."""
    cfg = trainer.cfg
    names = [n for n in cfg.TEST.OOD_SCORES if n in score_names() and "local_logits" in score_needs(n)]
    if not names or not getattr(trainer, "wants_local", False):
        return None
    settings = ScoreInputs(**score_settings(trainer, cfg))

    def reduce(local_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        x = local_logits.detach().float().cpu()
        return {f"local_{name}": v for name, v in reduce_local(names, x, settings).items()}

    return reduce
