"""Trainer classes (registered in ``TRAINER_REGISTRY`` on import)."""
from . import zsclip  # noqa: F401
