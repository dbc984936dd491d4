"""Reading config files: YAML only, parsed with ``yaml.safe_load`` (a config file is data, never code).

yacs' own ``merge_from_file`` would execute a ``.py`` config and reports YAML errors as a traceback in
``"<unicode string>"``; here a bad file is one :class:`ConfigError` naming the file, line and column.
"""
from __future__ import annotations

import os
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError

YAML_EXTS = (".yaml", ".yml", "")


def _syntax_error(path: str, what: str, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    ctx, ctx_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    started = f" ({ctx} started at line {ctx_mark.line + 1})" if ctx and ctx_mark is not None else ""
    return ConfigError(f"{what} {path}: YAML syntax error{where}: {problem}{started}")


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it: the same
# safe tags, about 5x faster (a sweep reads its configs once per run)


def read_yaml_config(path: str, what: str = "config") -> CN:
    """The config node in a YAML file; a missing, non-YAML, malformed or non-mapping file is one line."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file not found: {path}")
    if os.path.splitext(path)[1].lower() not in YAML_EXTS:
        raise ConfigError(f"{what} {path}: config files are YAML (.yaml or .yml); other files are not read "
                          f"(a Python config would be code)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f.read(), Loader=SAFE_LOADER)
    except yaml.YAMLError as err:
        raise _syntax_error(path, what, err) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path}: cannot read the file as UTF-8 text ({err})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected KEY: value mappings at the top level, found a "
                          f"{type(data).__name__}")
    try:
        return CN(data)
    except AssertionError as err:  # yacs: a value of a type configs cannot hold (e.g. a date)
        raise ConfigError(f"{what} {path}: {str(err).splitlines()[0]}") from None


def merge_yaml_file(cfg: CN, path: str, what: str = "config") -> None:
    """``cfg.merge_from_file(path)`` through :func:`read_yaml_config` (unknown keys / wrong types raise as in
    yacs: ``KeyError`` / ``ValueError``)."""
    node: Any = read_yaml_config(path, what)
    cfg.merge_from_other_cfg(node)
