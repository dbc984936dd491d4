"""In-memory memo of frozen image features for one evaluation pass over several open sets (``--eval-open-set``).

An image that the pass has already encoded under the test transform is not encoded again: its encoder output is
kept in memory, keyed by (transform, image path), and handed to the trainer through ``feature_provider``. This
is valid because, within a pass, the image encoder is frozen and in eval mode and the test transform is
deterministic, so an image always gets the same features; only the rounding of the batch it was first encoded
in can differ from another batch (a kernel may block another batch size differently). Only loaders that use the
test transform are wrapped: images under a random transform (e.g. the official training transform of the open-set
images, ``DATALOADER.OOD_TEST.TRANSFORM train``) are always encoded, and their loader draws its crops from the
random stream a separate run has. Encoding draws no random numbers, so a served feature leaves the random state
as encoding would; the trainer's own layers run on every batch as usual (batch-dependent heads and evaluation
noise stay as in a separate run). Local features (``infer_local``) are never memoised.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

MEMO_TRANSFORMS = ("test",)  # deterministic transforms; any other name is passed through unwrapped


class ImageMemo:
    """Features of the images a pass encoded, ``(transform, impath) -> encoder output row``."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.rows: dict[tuple[str, str], torch.Tensor] = {}
        self.current: Optional[tuple[str, list[str], torch.Tensor]] = None  # the batch a wrapped loader yielded
        self.served = 0   # rows handed out from memory
        self.encoded = 0  # rows encoded through the memo

    @classmethod
    def install(cls, trainer: Any) -> tuple[Optional["ImageMemo"], str]:
        """A memo set as ``trainer.feature_provider``, or ``(None, why not)`` (a feature cache already serves
        features; no frozen image encoder)."""
        if trainer.feature_provider is not None or getattr(trainer, "feature_cache", None) is not None:
            return None, "the feature cache serves the features"
        if trainer.image_encoder is None:
            return None, f"{type(trainer).__name__} has no frozen image encoder"
        memo = cls(trainer)
        trainer.feature_provider = memo.provide
        return memo, ""

    def wrap(self, loader: Any, transform: str) -> Any:
        """``loader`` through the memo when its images use a deterministic transform (``MEMO_TRANSFORMS``),
        else unchanged."""
        if loader is None or transform not in MEMO_TRANSFORMS or isinstance(loader, _MemoLoader):
            return loader
        return _MemoLoader(loader, self, transform)

    def stats(self) -> dict[str, int]:
        return {"served": self.served, "encoded": self.encoded, "images": len(self.rows)}

    @torch.no_grad()
    def provide(self, images: torch.Tensor, batch: Optional[dict] = None) -> Optional[torch.Tensor]:
        """The features of the batch a wrapped loader yielded (served rows + the missing ones encoded as one
        sub-batch); ``None`` (the trainer encodes) for any other tensor and for local features."""
        cur = self.current
        if cur is None or images is not cur[2] or self.trainer.infer_local:
            return None
        keys = [(cur[0], p) for p in cur[1]]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        if missing:
            out = self._encode(images if len(missing) == len(keys) else images[missing])
            kept = out.detach().clone()
            for j, i in enumerate(missing):
                self.rows.setdefault(keys[i], kept[j])
            self.encoded += len(missing)
            if len(missing) == len(keys):
                return out  # nothing served: exactly the encoder's output for this batch
        self.served += len(keys) - len(missing)
        return torch.stack([self.rows[k] for k in keys])

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """The trainer's own ``encode_images`` (its dtype, device and image count) with the memo switched off."""
        tr = self.trainer
        tr.feature_provider = None
        try:
            return tr.encode_images(images)
        finally:
            tr.feature_provider = self.provide


class _MemoLoader:
    """Yields the batches of ``loader`` with ``img`` already on the trainer's device and tells the memo which
    images they are (the trainer's ``parse_batch_test`` then passes that very tensor to ``encode_images``)."""

    def __init__(self, loader: Any, memo: ImageMemo, transform: str) -> None:
        self.loader = loader
        self.memo = memo
        self.transform = transform

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        device = self.memo.trainer.device
        try:
            for batch in self.loader:
                batch = dict(batch, img=batch["img"].to(device))
                self.memo.current = (self.transform, list(batch["impath"]), batch["img"])
                yield batch
        finally:
            self.memo.current = None
