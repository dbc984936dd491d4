"""Dataset classes (registered in ``DATASET_REGISTRY`` on import)."""
from . import lodo, openset  # noqa: F401
