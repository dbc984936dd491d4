"""Trainer classes (registered in ``TRAINER_REGISTRY`` on import)."""
from . import croft, zsclip  # noqa: F401
