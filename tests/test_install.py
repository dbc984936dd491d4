"""The engine is installable (``pip install -e .``) and its library code holds no sys.path / os.chdir edits;
the table of defaults (docs/extending.md) that differ from upstream Dassl matches the config."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARIES = ("dassl", "clip", "clip_backbone", "launch", "trainers", "datasets", "demo")


def _readme_defaults_table() -> list[tuple[str, str, str]]:
    with open(os.path.join(REPO, "docs", "extending.md"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("### Defaults that differ from upstream Dassl", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `([A-Z_.]+)` \| `([^`]+)` \| `([^`]+)` \|", block, flags=re.M)
    assert rows, "README defaults table not found"
    return rows


def test_readme_defaults_table_matches_the_config_and_overrides_restore_upstream():
    from dassl.config import get_cfg_default

    for key, here, upstream in _readme_defaults_table():
        cfg = get_cfg_default()
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == ast.literal_eval(here), key
        cfg.merge_from_list([key, upstream])
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == ast.literal_eval(upstream), key


def test_library_code_has_no_sys_path_edits_or_chdir():
    offenders = []
    for lib in LIBRARIES:
        for folder, _, files in os.walk(os.path.join(REPO, "CoOp", lib)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        src = f.read()
                    if re.search(r"sys\.path\.(insert|append)|os\.chdir\(", src):
                        offenders.append(os.path.relpath(path, REPO))
    assert offenders == []


@pytest.mark.slow
def test_editable_install_exposes_the_libraries_only(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", py] if _pip_has_python_flag() else None
    if pip is None:
        pytest.skip("pip too old for --python")
    subprocess.run([*pip, "install", "-q", "--no-deps", "-e", REPO, "--config-settings", "editable_mode=strict"],
                   check=True, cwd=str(tmp_path))
    probe = ("import importlib.util as u\n"
             "print([m for m in ('dassl', 'clip', 'clip_backbone', 'launch') if u.find_spec(m) is None],"
             " [m for m in ('datasets', 'trainers', 'train') if u.find_spec(m) is not None])")
    out = subprocess.run([py, "-c", probe], check=True, cwd=str(tmp_path), capture_output=True, text=True)
    assert out.stdout.strip() == "[] []"


def _pip_has_python_flag() -> bool:
    res = subprocess.run([sys.executable, "-m", "pip", "--python", sys.executable, "--version"],
                         capture_output=True, text=True)
    return res.returncode == 0
