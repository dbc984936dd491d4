"""Every config key is read somewhere; keys of other trainers are refused when set; config.yaml holds one node."""
from __future__ import annotations

import os
import re

import pytest
import yaml

from helpers import COOP, cli_args, run_cli
from synthetic import write_lodo_tree

LIBRARY_DIRS = ("dassl", "trainers", "datasets", "launch", "clip_backbone", "tools", "scripts")


def _sources() -> dict[str, str]:
    out = {}
    for top in LIBRARY_DIRS:
        for root, _, files in os.walk(os.path.join(COOP, top)):
            for f in files:
                path = os.path.join(root, f)
                if f.endswith(".py") and not path.endswith(os.path.join("config", "defaults.py")):
                    out[path] = open(path, encoding="utf-8").read()
    for f in os.listdir(COOP):
        if f.endswith(".py"):
            out[f] = open(os.path.join(COOP, f), encoding="utf-8").read()
    return out


def _leaves(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _full_cfg():
    import train
    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    train.extend_cfg(cfg)
    return cfg


def test_every_key_is_read_somewhere():
    from dassl.config import COMPAT_KEYS

    sources = _sources()
    dead = []
    for key in _leaves(_full_cfg()):
        if key in COMPAT_KEYS:
            continue
        leaf = key.split(".")[-1]
        word = re.compile(r"\b" + re.escape(leaf) + r"\b")
        definition = re.compile(r"\b\w+\." + re.escape(leaf) + r"\s*=(?!=)")  # c.LEAF = default
        if not any(len(word.findall(s)) > len(definition.findall(s)) for s in sources.values()):
            dead.append(key)
    assert dead == [], f"config keys never read (remove them or add them to COMPAT_KEYS): {dead}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys_data")
    write_lodo_tree(str(root), per_class=2)
    return str(root)


def test_croft_config_yaml_holds_only_its_node(data_root, tmp_path):
    out = tmp_path / "run"
    rec = run_cli(cli_args(data_root, str(out), "CRoFT", flags=["--eval-only"]))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert set(saved["TRAINER"]) == {"NAME", "CRoFT"}
    assert set(rec["config"]["TRAINER"]) == {"NAME", "CRoFT"}
    assert set(_full_cfg().TRAINER) > {"NAME", "CRoFT", "COOP", "ZSCLIP"}  # the defaults did hold every node


def test_zeroshot_clip_keeps_its_own_node(data_root, tmp_path):
    out = tmp_path / "zs"
    run_cli(cli_args(data_root, str(out), "ZeroshotCLIP", flags=["--eval-only"]))
    assert set(yaml.safe_load((out / "config.yaml").read_text())["TRAINER"]) == {"NAME", "ZSCLIP"}


def test_a_key_the_trainer_ignores_is_refused(data_root, tmp_path):
    from dassl.utils.errors import ConfigError

    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match=r"TRAINER\.DPLCLIP\.MLP_DEPTH is set to 5 but trainer CRoFT reads only "
                                          r"TRAINER\.CRoFT"):
        run_cli(cli_args(data_root, str(out), "CRoFT", flags=["--eval-only"], extra=["TRAINER.DPLCLIP.MLP_DEPTH", "5"]))
    assert not out.exists()
    with pytest.raises(ConfigError, match="TEST.PER_CLASS_RESULT"):  # removed dead key: unknown
        run_cli(cli_args(data_root, str(out), "CRoFT", flags=["--eval-only"], extra=["TEST.PER_CLASS_RESULT", "True"]))


def test_compat_keys_are_exempt(data_root, tmp_path):
    from dassl.config import COMPAT_KEYS

    assert "TRAINER.COOP.N_CTX" in COMPAT_KEYS
    out = tmp_path / "compat"
    rec = run_cli(cli_args(data_root, str(out), "CRoFT", flags=["--eval-only"], extra=["TRAINER.COOP.N_CTX", "4"]))
    assert "COOP" not in rec["config"]["TRAINER"]


def test_configs_read_with_libyaml_as_with_the_python_parser():
    """Configs are parsed with libyaml's safe loader when PyYAML has it (``dassl.config.loading.SAFE_LOADER``):
    every shipped config reads the same as with ``yaml.safe_load``."""
    import glob

    import yaml

    from dassl.config import loading

    assert loading.SAFE_LOADER is (yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader)
    paths = glob.glob(os.path.join(COOP, "configs", "**", "*.yaml"), recursive=True)
    assert len(paths) > 30
    for path in paths:
        text = open(path, encoding="utf-8").read()
        assert yaml.load(text, Loader=loading.SAFE_LOADER) == yaml.safe_load(text), path
