"""Figures from collected runs (headless Agg canvas, never pyplot's global state; PNGs written atomically).

* :func:`sensitivity`: held-out accuracy and detection (FPR95 / AUROC) against a swept hyper-parameter
  (CRoFT's lambda2 or lambda1), one panel per held-out domain, mean over seeds with a ±1 std band;
* :func:`score_histograms`: per method, the score of ID (source-domain val), closed-set OOD (held-out domain)
  and open-set OOD images;
* :func:`roc_curves`: per method, the ROC of held-out-domain (ID) against open-set images, with the ID side of
  the table (:func:`table_id_side`: the correctly classified held-out images for energy/MCM/MSP in Setup-II, all
  of them for KNN), named in the legend, so the legend's AUROC is the table's;
* :func:`plot_sweep`: all of them for a sweep's evaluation root (``collect_result_set2_oodd.py --plots DIR``;
  histograms and ROC curves for each ``--scores`` entry, default energy and MCM).
"""
from __future__ import annotations

import io
import os
import re
from collections import defaultdict
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dassl.utils.tools import atomic_write_bytes
from launch.results import scores_file

PARAM_PATTERNS = {"lambda2": r"(?:^|_)l2-([-+0-9.e]+)", "lambda1": r"(?:^|_)l1-([-+0-9.e]+)"}


def save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def param_value(setting: str, param: str) -> float:
    """The value of ``param`` encoded in a sweep setting tag such as ``demo_digits_l1-15_l2-10_r0.2``."""
    m = re.search(PARAM_PATTERNS[param], setting)
    if m is None:
        raise ValueError(f"setting {setting!r} encodes no {param}")
    return float(m.group(1).rstrip("_"))


def _band(ax: Any, xs: list[float], per_x: Mapping[float, list[float]], label: str) -> None:
    mean = np.array([np.mean(per_x[x]) for x in xs])
    std = np.array([np.std(per_x[x], ddof=1) if len(per_x[x]) > 1 else 0.0 for x in xs])
    ax.plot(xs, mean, marker="o", label=label)
    ax.fill_between(xs, mean - std, mean + std, alpha=0.2)


def sensitivity(rows: Sequence[dict[str, Any]], path: str, param: str = "lambda2",
                metrics: Sequence[tuple[str, str]] = (("acc", "held-out accuracy %"), ("mcm_fpr95", "FPR95 % (MCM)"),
                                                      ("mcm_auroc", "AUROC % (MCM)")), title: str = "") -> str:
    """Rows (one per run: method, setting, domain, seed and metric keys) -> grid of panels (metric x domain);
    one line per method, x = ``param`` (symlog axis), values per seed averaged over open sets first."""
    domains = sorted({r["domain"] for r in rows})
    fig = Figure(figsize=(3.2 * len(domains), 2.6 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), len(domains), squeeze=False)
    for i, (key, label) in enumerate(metrics):
        for j, dom in enumerate(domains):
            ax = axes[i][j]
            for method in dict.fromkeys(r["method"] for r in rows):
                unit: dict = defaultdict(list)
                for r in rows:
                    if r["method"] == method and r["domain"] == dom and r.get(key) is not None:
                        unit[(param_value(r["setting"], param), r["seed"])].append(r[key])
                per_x: dict = defaultdict(list)
                for (x, _), v in unit.items():
                    per_x[x].append(float(np.mean(v)))
                if per_x:
                    _band(ax, sorted(per_x), per_x, method)
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_title(f"held out: {dom}" if i == 0 else "", fontsize=9)
            ax.set_xlabel(param if i == len(metrics) - 1 else "")
            ax.set_ylabel(label if j == 0 else "")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def score_histograms(groups: Mapping[str, Mapping[str, np.ndarray]], path: str, xlabel: str = "score",
                     title: str = "", bins: int = 50) -> str:
    """``{method: {group label: scores}}`` -> one panel per method with shared bins per panel (densities)."""
    n = len(groups)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, (method, per_group) in zip(axes, groups.items()):
        allv = np.concatenate([np.asarray(v, float) for v in per_group.values()])
        edges = np.linspace(allv.min(), allv.max(), bins + 1)
        for label, v in per_group.items():
            ax.hist(v, bins=edges, density=True, alpha=0.4, label=f"{label} (n={len(v)})")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> Figure:
    """``{label: (ID scores, OOD scores)}`` (higher = more ID) -> a figure of ROC curves, AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    for label, (id_s, ood_s) in curves.items():
        y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
        s = np.r_[id_s, ood_s]
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{label} (AUROC {100 * roc_auc_score(y, s):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("FPR (open-set images accepted)")
    ax.set_ylabel("TPR (ID images accepted)")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str, title: str = "") -> str:
    """:func:`roc_figure` written to ``path``."""
    return save(roc_figure(curves, title), path)


def table_id_side(run_dir: str, score: str, arr: Optional[Mapping[str, np.ndarray]] = None
                  ) -> Optional[tuple[np.ndarray, np.ndarray, str]]:
    """(ID scores, open-set scores, what the ID side is) of an evaluation run as its record's detection metrics
    use them: the ``TEST.OOD_ID_SPLIT`` images, only the correctly classified ones when the record says
    ``id_correct_only`` (energy/MCM/MSP in Setup-II), so an ROC curve's AUROC is the table's. None when the run
    saved no such score."""
    from dassl.engine.ood_eval import id_keep_mask
    from dassl.engine.records import load_record

    arr = scores_file(run_dir) if arr is None else arr
    record = load_record(run_dir)
    det = record.get("metrics", {}).get("ood", {}).get(score)
    split = record.get("config", {}).get("TEST", {}).get("OOD_ID_SPLIT", "test")
    if arr is None or det is None or f"{split}__score_{score}" not in arr:
        return None
    keep = id_keep_mask(arr[f"{split}__logits"], arr[f"{split}__labels"], bool(det.get("id_correct_only")))
    which = f"{'correctly classified' if det.get('id_correct_only') else 'all'} {split} images, n={int(keep.sum())}"
    return arr[f"{split}__score_{score}"][keep], arr[f"ood_test__score_{score}"], which


def swept(rows: Sequence[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """Rows of the methods whose settings take more than one value of ``param``."""
    vals: dict[str, set] = defaultdict(set)
    for r in rows:
        if re.search(PARAM_PATTERNS[param], r["setting"]):
            vals[r["method"]].add(param_value(r["setting"], param))
    return [r for r in rows if len(vals.get(r["method"], ())) > 1]


def plot_sweep(rows: Sequence[dict[str, Any]], out_dir: str, chosen: Optional[Sequence[dict[str, Any]]] = None,
               scores: Sequence[str] = ("energy", "mcm")) -> dict[str, str]:
    """Every figure of a Setup-II sweep (rows of :func:`launch.results.rows`): sensitivity to lambda2 / lambda1
    where they were swept, and per score of ``scores`` (any registered score the runs saved) histograms and ROC
    curves of the first held-out domain and open set (``chosen``: the rows after selecting one setting per
    method; default all rows). Returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    out: dict[str, str] = {}
    for param in ("lambda2", "lambda1"):
        if swept(rows, param):
            out[param] = sensitivity(swept(rows, param), os.path.join(out_dir, f"{param}_sensitivity.png"), param,
                                     title=f"held-out accuracy and MCM detection vs {param} (mean ± std over seeds)")
    chosen = list(chosen if chosen is not None else rows)
    if not chosen:
        return out
    dom, ood = chosen[0]["domain"], chosen[0]["ood"]
    for score in scores:
        groups, curves = {}, {}
        for method in dict.fromkeys(r["method"] for r in chosen):
            pick = next((r for r in chosen if r["method"] == method and r["domain"] == dom and r["ood"] == ood), None)
            arr = scores_file(pick["dir"]) if pick else None
            if arr is None or f"val__score_{score}" not in arr:
                continue
            groups[method] = {"ID (source val)": arr[f"val__score_{score}"],
                              f"closed-set OOD ({dom})": arr[f"test__score_{score}"],
                              f"open-set OOD ({ood})": arr[f"ood_test__score_{score}"]}
            side = table_id_side(pick["dir"], score, arr)  # the ID side of the table's AUROC
            if side is not None:
                curves[f"{method} [ID: {side[2]}]"] = side[:2]
        if groups:
            out[f"hist_{score}"] = score_histograms(groups, os.path.join(out_dir, f"hist_{score}.png"),
                                                    xlabel=f"{score} score (higher = more ID)",
                                                    title=f"{score} scores, held out {dom}, open set {ood}")
            if curves:
                out[f"roc_{score}"] = roc_curves(curves, os.path.join(out_dir, f"roc_{score}.png"),
                                                 title=f"{score}: held-out {dom} (ID, as in the table) vs {ood}")
    return out
