"""Dataset classes (registered in ``DATASET_REGISTRY`` on import)."""
from . import imagenet46, lodo, openset  # noqa: F401
