"""Registration by dropping a file: import every module of the ``trainers/`` and ``datasets/`` folders.

Trainer and dataset classes register themselves on import (``@TRAINER_REGISTRY.register()``,
``@DATASET_REGISTRY.register()``), so a CoOp-family file copied into one of these folders is usable without
editing any ``__init__.py``. The folders are imported as the packages ``trainers`` and ``datasets`` (their
own relative imports, e.g. ``from .oxford_pets import OxfordPets``, keep working); a module that fails to
import is one :class:`~dassl.utils.errors.UserError` line naming its file.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Sequence

from .errors import ConfigError, UserError

PLUGIN_FOLDERS = ("trainers", "datasets")


def _package(name: str, folder: str) -> types.ModuleType:
    """The package ``name`` for ``folder`` (already imported, or imported now without touching sys.path)."""
    folder = os.path.abspath(folder)
    loaded = sys.modules.get(name)
    if loaded is not None:
        paths = [os.path.abspath(p) for p in getattr(loaded, "__path__", [])]
        if folder not in paths:
            where = paths[0] if paths else getattr(loaded, "__file__", "?")
            raise ConfigError(f"cannot load the plug-in folder {folder}: a different '{name}' package is already "
                              f"imported from {where}")
        return loaded
    init = os.path.join(folder, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except UserError:
            sys.modules.pop(name, None)
            raise
        except Exception as err:
            sys.modules.pop(name, None)
            raise UserError(f"cannot import plug-in {init}: {type(err).__name__}: {err}") from None
        return module
    module = types.ModuleType(name)
    module.__path__ = [folder]
    sys.modules[name] = module
    return module


def module_names(folder: str) -> list[str]:
    """Importable modules of ``folder``: ``*.py`` files and sub-packages, not starting with ``_`` or ``.``."""
    names = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.startswith(("_", ".")):
            continue
        if entry.endswith(".py") and os.path.isfile(path):
            names.append(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            names.append(entry)
    return names


def import_submodules(package: str, folder: str) -> list[types.ModuleType]:
    """Import every module of the package ``package`` living in ``folder``; return them in name order."""
    modules = []
    for name in module_names(folder):
        try:
            modules.append(importlib.import_module(f"{package}.{name}"))
        except UserError:
            raise
        except Exception as err:
            path = os.path.join(folder, name + ("" if os.path.isdir(os.path.join(folder, name)) else ".py"))
            raise UserError(f"cannot import plug-in {path}: {type(err).__name__}: {err}") from None
    return modules


def load_plugins(base_dir: str, folders: Sequence[str] = PLUGIN_FOLDERS) -> list[types.ModuleType]:
    """Import ``<base_dir>/<folder>/*`` for each folder that exists; return the imported modules."""
    modules: list[types.ModuleType] = []
    for name in folders:
        folder = os.path.join(os.path.abspath(base_dir), name)
        if os.path.isdir(folder):
            _package(name, folder)
            modules.extend(import_submodules(name, folder))
    return modules
