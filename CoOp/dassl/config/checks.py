"""Keys the running trainer ignores: a non-default value there is a one-line error, and saved configs drop them.

Every ``TRAINER.<NODE>`` sub-node belongs to one trainer: the node named by the trainer class's ``cfg_node``
attribute (default: the registered name, compared case-insensitively, as Dassl/CoOp do for ``TRAINER.COOP``).
Setting a key of another trainer's node would silently do nothing, so :func:`check_ignored_keys` refuses it,
except for the Dassl/CoOp compatibility keys (:data:`dassl.config.COMPAT_KEYS`) that upstream scripts pass to
every trainer. :func:`dassl.config.clean_cfg` then drops the other nodes before ``config.yaml`` is written.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError


def trainer_node(trainer_cls: Any, name: str) -> str:
    """Name of the ``TRAINER.<node>`` a trainer reads (``cfg_node`` class attribute, else its registered name)."""
    return getattr(trainer_cls, "cfg_node", "") or name


def _leaves(node: CN, prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def differing_keys(a: CN, b: CN, ignore: Iterable[str] = ()) -> list[str]:
    """Dotted config keys whose values differ between ``a`` and ``b`` (or that only one has), minus ``ignore``."""
    fa, fb = dict(_leaves(a, "")), dict(_leaves(b, ""))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and k not in set(ignore))


def _lookup(node: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check_ignored_keys(cfg: CN, defaults: CN, node: str, trainer: str, exempt: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` if ``cfg`` sets a key of another trainer's node to a non-default value.

    Args:
        cfg: the merged config. defaults: the config before any file or override was merged.
        node: the running trainer's ``TRAINER`` sub-node. trainer: its name (for the message).
        exempt: full keys kept for upstream compatibility (never refused).
    """
    exempt = set(exempt)
    for key, sub in cfg.TRAINER.items():
        if not isinstance(sub, CN) or key.upper() == node.upper():
            continue
        for full, value in _leaves(sub, f"TRAINER.{key}."):
            if full in exempt or value == _lookup(defaults, full):
                continue
            raise ConfigError(f"{full} is set to {value!r} but trainer {trainer} reads only TRAINER.{node}; "
                              f"remove it (or run the trainer that reads TRAINER.{key})")
