"""Trainer classes (registered in ``TRAINER_REGISTRY`` on import)."""
from . import bcal, clip_adapter, cocoop, coop, croft, dplclip, tip_adapter, zsclip  # noqa: F401
