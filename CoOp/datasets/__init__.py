"""Dataset plug-ins: importing this package imports every module in this folder, so each dataset class
registers in ``DATASET_REGISTRY``. A CoOp-family dataset file copied here is picked up without edits."""
import os as _os

from dassl.utils.plugins import import_submodules as _import_submodules

_import_submodules(__name__, _os.path.dirname(_os.path.abspath(__file__)))
