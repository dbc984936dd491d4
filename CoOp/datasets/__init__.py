"""Dataset classes (registered in ``DATASET_REGISTRY`` on import)."""
from . import lodo  # noqa: F401

try:  # open-set evaluation datasets (PACS_DTD, ...)
    from . import openset  # noqa: F401
except ImportError as _err:  # pragma: no cover - only while the module is absent
    if "openset" not in str(_err):
        raise
