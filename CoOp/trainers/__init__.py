"""Trainer plug-ins: importing this package imports every module in this folder, so each trainer class
registers in ``TRAINER_REGISTRY``. A CoOp-family trainer file copied here is picked up without edits."""
import os as _os

from dassl.utils.plugins import import_submodules as _import_submodules

_import_submodules(__name__, _os.path.dirname(_os.path.abspath(__file__)))
