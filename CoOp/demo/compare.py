"""``python -m demo.compare CACHE_A CACHE_B`` (from ``CoOp/``): how far the rows of two demo runs moved, e.g. the
same demo under other CPU kernels, and whether their verdicts agree (exit code 0 only when they do).

Per table of the report (held-out accuracy; FPR95 and AUROC of each score) it prints the largest absolute
difference over the runs both have (one value per run and open set) and over the table's cells (mean over seeds
per method and held-out domain, λ2 selected on validation accuracy in each cache), then the claim's effects and
both verdict lines.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from demo import report, selection, tables, verdict

RUN_KEYS = ("method", "setting", "domain", "seed", "ood")


def table_keys(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(metric key, label) of every table the rows fill: accuracy, then FPR95 and AUROC per score."""
    out = [("acc", "held-out accuracy")]
    for score, name in report.SCORE_NAMES.items():
        for metric in ("fpr95", "auroc"):
            if any(r.get(f"{score}_{metric}") is not None for r in rows):
                out.append((f"{score}_{metric}", f"{name} {metric.upper()}"))
    return out


def cells(rows: list[dict[str, Any]], key: str) -> dict[tuple[str, str], float]:
    """(method, domain) -> mean over seeds of ``key`` (per seed averaged over the open sets)."""
    out = {}
    for method, units in tables.per_unit(rows, key).items():
        for dom in {d for d, _ in units}:
            out[(method, dom)] = float(np.mean([v for (d, _), v in units.items() if d == dom]))
    return out


def max_moved(a: dict, b: dict) -> tuple[int, float]:
    """(number of common keys, largest |a - b| over them)."""
    common = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    return len(common), max((abs(a[k] - b[k]) for k in common), default=float("nan"))


def moved(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], select: str = "val") -> list[dict[str, Any]]:
    """Per table: runs compared, max |Δ| over runs, max |Δ| over the table's cells."""
    out = []
    for key, label in table_keys(rows_a):
        per_run = [{tuple(r[k] for k in RUN_KEYS): r.get(key) for r in rows} for rows in (rows_a, rows_b)]
        n, run_max = max_moved(*per_run)
        _, cell_max = max_moved(cells(selection.select(rows_a, select), key),
                                cells(selection.select(rows_b, select), key))
        out.append({"table": label, "runs": n, "max_run": run_max, "max_cell": cell_max})
    return out


def identical_runs(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], caches: Sequence[str] = ("", "")
                   ) -> tuple[int, int]:
    """(runs whose ``scores.npz`` arrays are bit for bit equal, runs both have); image paths are compared below
    their ``caches`` folder (two cache folders hold the same data tree at two places)."""
    dirs_b = {tuple(r[k] for k in RUN_KEYS): r["dir"] for r in rows_b}
    same = total = 0
    for r in rows_a:
        other = dirs_b.get(tuple(r[k] for k in RUN_KEYS))
        if other is None:
            continue
        total += 1
        with np.load(os.path.join(r["dir"], "scores.npz")) as a, np.load(os.path.join(other, "scores.npz")) as b:
            same += sorted(a.files) == sorted(b.files) and all(
                _equal(a[k], b[k], caches) for k in a.files)
    return same, total


def _equal(x: np.ndarray, y: np.ndarray, caches: Sequence[str]) -> bool:
    """Same dtype and bits; text (image paths) with each side's cache folder cut off."""
    if x.dtype.kind == "U" and y.dtype.kind == "U":
        cut = [os.path.abspath(c) + os.sep if c else "" for c in caches]
        x, y = (np.array([v[len(c):] if c and v.startswith(c) else v for v in arr.tolist()], dtype=str)
                for arr, c in ((x, cut[0]), (y, cut[1])))
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def load(cache: str, variant: str = "demo") -> list[dict[str, Any]]:
    """The evaluation rows of a demo cache folder (``<cache>/<variant>/eval_open_ood``)."""
    from launch import results

    root = os.path.join(cache, variant, "eval_open_ood")
    if not os.path.isdir(root):
        raise SystemExit(f"error: {root}: no demo evaluation runs (run python -m demo --cache {cache} first)")
    return results.rows(root)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("caches", nargs=2, help="two --cache folders of python -m demo")
    p.add_argument("--variant", default="demo", choices=["demo", "demo-full", "demo-quick"])
    p.add_argument("--select", choices=selection.MODES, default="val")
    p.add_argument("--bitwise", action="store_true", help="also count the runs whose saved scores are bit-identical")
    args = p.parse_args(argv)
    rows = [load(c, args.variant) for c in args.caches]
    print("| table | runs compared | max |Δ| over runs | max |Δ| over table cells |\n|---|---|---|---|")
    for m in moved(*rows, select=args.select):
        print(f"| {m['table']} | {m['runs']} | {m['max_run']:.2f} | {m['max_cell']:.2f} |")
    if args.bitwise:
        same, total = identical_runs(*rows, caches=args.caches)
        print(f"\n{same} of {total} runs bit-identical (every array of scores.npz)")
    lines = []
    for cache, r in zip(args.caches, rows):
        chosen = selection.select(r, args.select)
        effects = verdict.claim_effects(report.claim_units(chosen), "CRoFT", report.baselines(chosen))
        print(f"\n{cache}: {verdict.effects_text(effects)}")
        lines.append(verdict.verdict_line(effects))
        print(lines[-1])
    same = lines[0] == lines[1]
    print(f"\nverdict lines {'identical' if same else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
