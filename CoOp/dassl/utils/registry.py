"""Name -> class registry (``@REGISTRY.register()`` keyed by class name), as in Dassl/fvcore."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterator

from .errors import ConfigError


class Registry:
    """A mapping from names to objects with decorator registration and near-miss suggestions.

    >>> TRAINERS = Registry("TRAINER")
    >>> @TRAINERS.register()
    ... class MyTrainer: ...
    >>> TRAINERS.get("MyTrainer")
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._obj_map: dict[str, Any] = {}

    def _do_register(self, name: str, obj: Any, force: bool = False) -> None:
        if name in self._obj_map and not force and self._obj_map[name] is not obj:
            raise KeyError(f'An object named "{name}" was already registered in "{self._name}" registry')
        self._obj_map[name] = obj

    def register(self, obj: Any = None, force: bool = False) -> Any:
        """Register ``obj`` under its ``__name__``; usable as ``@register()`` or ``register(obj)``."""
        if obj is None:
            def deco(func_or_class: Callable) -> Callable:
                self._do_register(func_or_class.__name__, func_or_class, force=force)
                return func_or_class
            return deco
        self._do_register(obj.__name__, obj, force=force)
        return obj

    def get(self, name: str) -> Any:
        """Return the object registered as ``name``; unknown names raise with the nearest valid names."""
        if name not in self._obj_map:
            close = difflib.get_close_matches(name, list(self._obj_map), n=3, cutoff=0.3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f'unknown {self._name.lower()} "{name}"{hint} (available: {", ".join(sorted(self._obj_map))})')
        return self._obj_map[name]

    def registered_names(self) -> list[str]:
        return list(self._obj_map)

    def __contains__(self, name: str) -> bool:
        return name in self._obj_map

    def __iter__(self) -> Iterator[str]:
        return iter(self._obj_map)
