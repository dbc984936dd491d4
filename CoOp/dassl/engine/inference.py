"""The one contract between a trainer's ``model_inference`` and the evaluator: :class:`InferenceOutput`.

``model_inference(input)`` returns an :class:`InferenceOutput` (or, Dassl-style, the bare logits tensor). The
evaluator reads fields by name, never positions; a trainer that sets no ``score`` gets the energy
``logsumexp(logits)`` of its logits (the official detection score). A positional list is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["InferenceOutput", "as_inference_output"]


@dataclass
class InferenceOutput:
    """What one inference batch produced; every tensor has the batch size ``N`` as its first dimension.

    Attributes:
        logits: ``(N, C)`` class logits (CLIP scale ``s * cos``); classes a trainer pads use ``-inf``.
        features: ``(N, D)`` image features for feature-based scores (KNN), or None.
        score: ``(N,)`` the trainer's own detection score (higher = more ID); None means the energy of the logits.
        extras: further per-image tensors by name (saved as ``extra_<name>``; readable by scores).
    """

    logits: torch.Tensor
    features: Optional[torch.Tensor] = None
    score: Optional[torch.Tensor] = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.logits, torch.Tensor) or self.logits.dim() != 2:
            raise TypeError(f"InferenceOutput.logits must be an (N, C) tensor, got {_describe(self.logits)}")
        n = self.logits.shape[0]
        if self.score is None:
            self.score = torch.logsumexp(self.logits.detach().float(), dim=1)
        for name, value, dims in (("features", self.features, 2), ("score", self.score, 1),
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
