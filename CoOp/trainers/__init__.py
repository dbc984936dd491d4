"""Trainer classes (registered in ``TRAINER_REGISTRY`` on import)."""
from . import croft, zsclip  # noqa: F401
from . import clip_adapter, tip_adapter  # noqa: F401
from . import coop, cocoop, dplclip  # noqa: F401
