"""Markdown tables of the demo: held-out accuracy, detection per score, and paired tests between methods."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import numpy as np


def cell(values: Sequence[float]) -> str:
    """"mean ± std" over seeds (sample std, 0 for one value)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return "-"
    return f"{v.mean():.2f} ± {(v.std(ddof=1) if v.size > 1 else 0.0):.2f}"


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def per_unit(rows: list[dict[str, Any]], key: str) -> dict[str, dict[tuple[str, int], float]]:
    """method -> (domain, seed) -> ``key`` averaged over the open sets (and settings left in the rows)."""
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(key) is not None and not np.isnan(r[key]):
            acc[r["method"]][(r["domain"], r["seed"])].append(r[key])
    return {m: {u: float(np.mean(v)) for u, v in units.items()} for m, units in acc.items()}


def by_domain_table(rows: list[dict[str, Any]], keys: Sequence[str], domains: list[str],
                    fmt: Callable[[list[str]], str] = " / ".join) -> str:
    """Rows = methods, columns = held-out domains and Avg; each cell joins the ``keys`` (mean ± std over seeds;
    Avg is the per-seed mean over domains, then mean ± std over seeds)."""
    units = {k: per_unit(rows, k) for k in keys}
    body = []
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for d in domains:
            cells.append(fmt([cell([v for (dd, _), v in units[k].get(method, {}).items() if dd == d]) for k in keys]))
        seeds = sorted({s for k in keys for (_, s) in units[k].get(method, {})})
        avg = []
        for k in keys:
            u = units[k].get(method, {})
            avg.append(cell([np.mean([u[(d, s)] for d in domains]) for s in seeds if all((d, s) in u for d in domains)]))
        body.append([method, *cells, fmt(avg), str(len(seeds))])
    return markdown(["method", *domains, "Avg", "seeds"], body)


def paired_test(a: list[float], b: list[float]) -> tuple[float, str]:
    """Two-sided p-value of a paired test of a vs b: Wilcoxon signed-rank (scipy) or, without scipy, an exact
    sign test; returns (p, test name)."""
    d = np.asarray(a) - np.asarray(b)
    try:
        from scipy.stats import wilcoxon

        if np.all(d == 0):
            return 1.0, "wilcoxon"
        return float(wilcoxon(d).pvalue), "wilcoxon"
    except ImportError:
        from math import comb

        n, k = int((d != 0).sum()), int((d > 0).sum())
        tail = sum(comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n if n else 1.0
        return min(1.0, 2 * tail), "sign test"


def paired_table(rows: list[dict[str, Any]], ref: str, metrics: Sequence[tuple[str, str]]) -> Optional[str]:
    """For each method vs ``ref``: mean ± std of the paired difference over (held-out domain, seed) units and
    the paired test's p-value, per metric (key, label)."""
    units = {k: per_unit(rows, k) for k, _ in metrics}
    if ref not in units[metrics[0][0]]:
        return None
    body = []
    for method in dict.fromkeys(r["method"] for r in rows):
        if method == ref:
            continue
        cells = []
        for k, _ in metrics:
            ru, mu = units[k].get(ref, {}), units[k].get(method, {})
            common = sorted(set(ru) & set(mu))
            if len(common) < 2:
                cells.append("-")
                continue
            diff = [ru[u] - mu[u] for u in common]
            p, _ = paired_test([ru[u] for u in common], [mu[u] for u in common])
            cells.append(f"{cell(diff)} (p={p:.3g}, n={len(common)})")
        body.append([method, *cells])
    return markdown(["method", *[f"{ref} − method: {lab}" for _, lab in metrics]], body)
