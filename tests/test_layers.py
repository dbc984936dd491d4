"""The layer import rules of ARCHITECTURE.md: a module imports only from its own layer's allowed set (ast scan)."""
from __future__ import annotations

import ast
import os

from helpers import COOP

# top-level project module -> project modules it may import (itself always allowed); see ARCHITECTURE.md
ALLOWED = {
    "dassl": set(),
    "clip_backbone": {"dassl"},
    "clip": {"dassl", "clip_backbone"},
    "datasets": {"dassl"},
    "trainers": {"dassl", "clip_backbone", "clip"},
    "train": {"dassl", "clip_backbone", "clip", "datasets", "trainers"},
    "launch": {"dassl", "datasets", "trainers", "train"},
    "tools": {"dassl", "clip_backbone", "clip", "datasets", "trainers", "train", "launch", "demo"},
    "scripts": {"dassl", "clip_backbone", "clip", "datasets", "trainers", "train", "launch"},
    "demo": {"dassl", "clip_backbone", "clip", "datasets", "trainers", "train", "launch"},
    "collect_result": {"dassl", "launch"},
}
PROJECT = set(ALLOWED) - {"collect_result"}


def _layer(rel: str) -> str:
    top = rel.split(os.sep)[0]
    if top.endswith(".py"):
        top = top[:-3]
    return "collect_result" if top.startswith("collect_result_") else top


def _files() -> list[str]:
    out = []
    for name in sorted(os.listdir(COOP)):
        path = os.path.join(COOP, name)
        if name.endswith(".py"):
            out.append(name)
        elif os.path.isdir(path) and name in ALLOWED:
            for root, _, files in os.walk(path):
                out.extend(os.path.relpath(os.path.join(root, f), COOP) for f in files if f.endswith(".py"))
    return out


def _imports(rel: str) -> set[str]:
    tree = ast.parse(open(os.path.join(COOP, rel), encoding="utf-8").read(), rel)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: must stay inside its own top-level package
                depth = len(rel.split(os.sep)) - 1
                if node.level > depth:
                    found.add(f"<relative import above {rel.split(os.sep)[0]}>")
            elif node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m in PROJECT or m.startswith("<")}


def test_layer_table_covers_every_project_module():
    layers = {_layer(rel) for rel in _files()}
    assert {"dassl", "trainers", "datasets", "launch", "train"} <= layers
    assert layers <= set(ALLOWED), f"top-level modules missing from ALLOWED / ARCHITECTURE.md: {layers - set(ALLOWED)}"


def test_imports_follow_the_layers():
    bad = []
    for rel in _files():
        layer = _layer(rel)
        for mod in sorted(_imports(rel)):
            if mod != layer and mod not in ALLOWED[layer]:
                bad.append(f"{rel} imports {mod}")
    assert bad == [], "layer violations (see ARCHITECTURE.md):\n" + "\n".join(bad)


def test_the_scan_sees_a_violation(tmp_path, monkeypatch):
    import test_layers as me

    pkg = tmp_path / "dassl"
    pkg.mkdir()
    (pkg / "bad.py").write_text("import trainers.croft\nfrom ..launch import sweep\n")
    monkeypatch.setattr(me, "COOP", str(tmp_path))
    assert me._imports(os.path.join("dassl", "bad.py")) == {"trainers", "<relative import above dassl>"}
