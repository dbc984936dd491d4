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


def _launch_graph(root: str) -> dict[str, set[str]]:
    """``launch`` module -> the ``launch`` modules it imports (every import statement, also inside functions and
    ``TYPE_CHECKING`` blocks)."""
    folder = os.path.join(root, "launch")
    mods = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}
    graph: dict[str, set[str]] = {}
    for mod in sorted(mods):
        tree = ast.parse(open(os.path.join(folder, mod + ".py"), encoding="utf-8").read(), mod)
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "launch":
                names = [f"launch.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y / from . import x
                names = [f"launch.{node.module}"] if node.module else [f"launch.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            found.update(n.split(".")[1] for n in names if n.startswith("launch.") and n.split(".")[1] in mods)
        graph[mod] = found - {mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import path per cycle found by depth-first search (empty: the graph is acyclic)."""
    out, state = [], {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = "open"
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == "open":
                out.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[mod] = "closed"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    return out


def test_no_import_cycle_inside_launch():
    graph = _launch_graph(COOP)
    assert {"launchers", "sweep", "workers", "jobs", "setup2"} <= set(graph)
    assert "launchers" in graph["workers"] and "jobs" in graph["launchers"]  # the scan sees the real imports
    assert _cycles(graph) == [], "import cycles in launch/: " + "; ".join(" -> ".join(c) for c in _cycles(graph))


def test_the_cycle_scan_sees_a_cycle(tmp_path):
    pkg = tmp_path / "launch"
    pkg.mkdir()
    (pkg / "a.py").write_text("from launch.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from launch import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import launch.a\n")
    (pkg / "d.py").write_text("from . import a\n")
    graph = _launch_graph(str(tmp_path))
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
