"""List the runs the sweep manifests plan, or drop planned runs from them (e.g. a misspelt domain's).

    python tools/manifest.py list [--missing] [--root DIR]          # every manifest: each run, [done] or [todo]
    python tools/manifest.py drop 'CRoFT/*/test_on_skech.json/*'    # forget these planned runs (--dry-run: show)

Manifests are ``<root>/sweeps/<sweep>.json`` under ``--root`` (repeatable; default: ``output``,
``eval_open_ood`` and ``eval_setup1``, relative to the CoOp folder as the drivers' roots). A pattern is a
shell-style glob matched against a run's name (as the collectors list it under "Missing runs") or its output
directory. ``drop`` only edits the manifests (atomically): run directories are left alone, and a finished record
is still collected (labelled by its directory). A pattern that matches no planned run is an error (exit code 2).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from typing import Any, Optional, Sequence

COOP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, COOP_DIR)

from dassl.engine.records import is_done  # noqa: E402
from dassl.utils.errors import UserError  # noqa: E402
from dassl.utils.tools import atomic_write_json, read_json  # noqa: E402

DEFAULT_ROOTS = ("output", "eval_open_ood", "eval_setup1")


def manifest_files(roots: Sequence[str]) -> list[str]:
    """Every ``<root>/sweeps/*.json`` of ``roots``."""
    out = []
    for root in roots:
        folder = os.path.join(root, "sweeps")
        if os.path.isdir(folder):
            out += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".json")]
    return out


def _run_dir(run: dict[str, Any]) -> str:
    d = run["output_dir"]
    return d if os.path.isabs(d) else os.path.join(COOP_DIR, d)


def _done(run: dict[str, Any]) -> bool:
    """Finished as the drivers and collectors count it (of the planned fingerprint when the manifest has one)."""
    fingerprint = run.get("fingerprint")
    return is_done(_run_dir(run), fingerprint) if fingerprint else is_done(_run_dir(run))


def matches(run: dict[str, Any], patterns: Sequence[str]) -> bool:
    """Whether a manifest entry's name or output directory matches one of the glob ``patterns``."""
    return any(fnmatch.fnmatchcase(run["name"], p) or fnmatch.fnmatchcase(run["output_dir"], p) for p in patterns)


def drop(roots: Sequence[str], patterns: Sequence[str], dry_run: bool = False) -> list[tuple[str, dict]]:
    """Remove the runs matching ``patterns`` from every manifest under ``roots``; return (manifest, run) pairs.

    Raises UserError naming the first pattern that matches no planned run (nothing is written then)."""
    edits, dropped = [], []
    for path in manifest_files(roots):
        data = read_json(path)
        keep = [r for r in data["jobs"] if not matches(r, patterns)]
        gone = [r for r in data["jobs"] if matches(r, patterns)]
        if gone:
            edits.append((path, dict(data, jobs=keep)))
            dropped += [(path, r) for r in gone]
    for p in patterns:
        if not any(matches(r, [p]) for _, r in dropped):
            raise UserError(f"no planned run matches {p!r} in the manifests under {', '.join(roots)} "
                            f"(see: python tools/manifest.py list)")
    if not dry_run:
        for path, data in edits:
            atomic_write_json(path, data)
    return dropped


def _roots(given: Optional[Sequence[str]]) -> list[str]:
    roots = list(given or DEFAULT_ROOTS)
    return [r if os.path.isabs(r) else os.path.join(COOP_DIR, os.path.expanduser(r)) for r in roots]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="List or drop the planned runs of the sweep manifests")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", action="append", help="an output/evaluation root holding sweeps/ (repeatable; "
                                                        "default: output, eval_open_ood, eval_setup1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", parents=[common], help="every planned run, [done] or [todo]")
    ls.add_argument("--missing", action="store_true", help="only the runs without a done marker")
    dr = sub.add_parser("drop", parents=[common],
                        help="remove the planned runs matching the patterns from the manifests")
    dr.add_argument("patterns", nargs="+", help="glob on a run's name or output directory")
    dr.add_argument("--dry-run", action="store_true", help="show what would be dropped")
    args = p.parse_args(argv)
    try:
        _run(args, _roots(args.root))
    except UserError as err:  # a malformed manifest, a pattern that matches nothing: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace, roots: list[str]) -> None:
    if args.cmd == "list":
        for path in manifest_files(roots):
            runs = [r for r in read_json(path)["jobs"] if not (args.missing and _done(r))]
            print(f"{path}: {len(runs)} runs")
            for r in runs:
                print(("  [done] " if _done(r) else "  [todo] ") + r["name"])
        return
    dropped = drop(roots, args.patterns, args.dry_run)
    verb = "would drop" if args.dry_run else "dropped"
    for path, r in dropped:
        print(f"{verb} {r['name']} ({'done' if _done(r) else 'not done'}) from {path}")
    print(f"{verb} {len(dropped)} planned runs")


if __name__ == "__main__":
    sys.exit(main())
