"""The ``train.py`` entry point as a module, for launchers that run jobs in-process (no sys.path edits)."""
from __future__ import annotations

import importlib.util
import os
import sys
import types

COOP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_module() -> types.ModuleType:
    """``train`` (``<CoOp>/train.py``): the already imported one, else loaded from its file as ``train``."""
    if "train" in sys.modules:
        return sys.modules["train"]
    path = os.path.join(COOP_DIR, "train.py")
    spec = importlib.util.spec_from_file_location("train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("train", None)
        raise
    return module
