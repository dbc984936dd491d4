"""Markdown tables of the demo: held-out accuracy, detection per score, and paired differences between methods."""
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


def avg_cell(units: dict[tuple[str, int], float], domains: list[str]) -> str:
    """Mean ± std over seeds of the per-seed mean over ``domains`` (seeds missing a domain are left out)."""
    seeds = sorted({s for (_, s) in units})
    return cell([np.mean([units[(d, s)] for d in domains]) for s in seeds if all((d, s) in units for d in domains)])


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
        avg = fmt([avg_cell(units[k].get(method, {}), domains) for k in keys])
        body.append([method, *cells, avg, str(len(seeds))])
    return markdown(["method", *domains, "Avg", "seeds"], body)


def average_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]], domains: list[str]) -> str:
    """Rows = methods, one column per (key, label): the Avg cell of :func:`by_domain_table`."""
    units = {k: per_unit(rows, k) for k, _ in columns}
    body = [[m, *[avg_cell(units[k].get(m, {}), domains) for k, _ in columns]]
            for m in dict.fromkeys(r["method"] for r in rows)]
    return markdown(["method", *[lab for _, lab in columns]], body)


def interval_cell(diff: Sequence[float]) -> str:
    """"+1.23 [-0.40, +2.86]": the paired mean difference and its 95 % Student-t interval."""
    from demo.verdict import t_interval

    mean, _, lo, hi = t_interval(diff)
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def paired_table(rows: list[dict[str, Any]], ref: str, metrics: Sequence[tuple[str, str]]) -> Optional[str]:
    """For each method vs ``ref``: the mean paired difference ``ref - method`` over (held-out domain, seed) units
    with its 95 % Student-t interval, per metric (key, label)."""
    units = {k: per_unit(rows, k) for k, _ in metrics}
    if ref not in units[metrics[0][0]]:
        return None
    body = []
    for method in dict.fromkeys(r["method"] for r in rows):
        if method == ref:
            continue
        cells, pairs = [], []
        for k, _ in metrics:
            ru, mu = units[k].get(ref, {}), units[k].get(method, {})
            common = sorted(set(ru) & set(mu))
            cells.append(interval_cell([ru[u] - mu[u] for u in common]) if len(common) >= 2 else "-")
            pairs.append(len(common))
        body.append([method, *cells, str(pairs[0])])
    return markdown(["method", *[f"{ref} − method: {lab}" for _, lab in metrics], "pairs"], body)
