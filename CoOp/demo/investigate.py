"""Why a method's energy score can rank open-set images above held-out ID images.

The energy score of logits ``l`` (one per class) splits exactly into a class-agnostic part and a class-
discriminative part: ``logsumexp(l) = mean(l) + logsumexp(l - mean(l))``. The first part only says how close an
image is to the classes' common text direction; the second how much one class stands out. This module measures,
per method and held-out domain, the AUROC (ID = held-out-domain images, OOD = an open set) of the energy and of
each part, and plots both parts for two held-out domains.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np
from scipy.special import logsumexp


def parts(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class-agnostic mean logit, class-discriminative logsumexp of the centred logits); they sum to the energy."""
    mean = logits.mean(axis=1)
    return mean, logsumexp(logits - mean[:, None], axis=1)


def auroc(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return 100.0 * float(roc_auc_score(np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))], np.r_[id_s, ood_s]))


def logits_of(run_dir: str) -> Optional[dict[str, np.ndarray]]:
    """The held-out and open-set logits a run saved in ``scores.npz`` (only those two arrays are read), or None."""
    path = os.path.join(run_dir, "scores.npz")
    if not os.path.isfile(path):
        return None
    with np.load(path) as z:
        return {k: z[k] for k in ("test__logits", "ood_test__logits")}


def decompose(run_dir_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per evaluation row (with ``dir``): AUROC (%) of energy, of the mean logit and of the centred logsumexp, and
    ``spread`` = std of the class-agnostic part / std of the class-discriminative part over ID and open-set images."""
    out = []
    for r in run_dir_rows:
        arr = logits_of(r["dir"])
        if arr is None:
            continue
        (mi, ci), (mo, co) = parts(arr["test__logits"]), parts(arr["ood_test__logits"])
        out.append(dict(method=r["method"], domain=r["domain"], seed=r["seed"], ood=r["ood"],
                        energy=auroc(mi + ci, mo + co), agnostic=auroc(mi, mo), discriminative=auroc(ci, co),
                        spread=float(np.std(np.r_[mi, mo]) / np.std(np.r_[ci, co]))))
    return out


def table(dec: list[dict[str, Any]], ood: str) -> str:
    """Markdown: method x held-out domain, cells "energy / class-agnostic / class-discriminative" AUROC (%)."""
    from demo.tables import markdown

    domains = sorted({d["domain"] for d in dec})
    body = []
    for method in dict.fromkeys(d["method"] for d in dec):
        cells = []
        for dom in domains:
            sel = [d for d in dec if d["method"] == method and d["domain"] == dom and d["ood"] == ood]
            cells.append(" / ".join(f"{np.mean([d[k] for d in sel]):.1f}" for k in ("energy", "agnostic",
                                                                                  "discriminative")) if sel else "-")
        body.append([method, *cells])
    return markdown(["method", *domains], body)


def figure(rows: Sequence[dict[str, Any]], method: str, domains: Sequence[str], ood: str, path: str,
           seed: int = 1) -> Optional[str]:
    """Scatter of (class-agnostic, class-discriminative) parts, ID vs open set, one panel per held-out domain."""
    from matplotlib.figure import Figure

    from launch.figures import save

    picked = [next((r for r in rows if r["method"] == method and r["domain"] == d and r["ood"] == ood
                    and r["seed"] == seed), None) for d in domains]
    if any(p is None for p in picked):
        return None
    fig = Figure(figsize=(4.2 * len(domains), 3.6), layout="constrained")
    axes = fig.subplots(1, len(domains), squeeze=False)[0]
    for ax, r in zip(axes, picked):
        arr = logits_of(r["dir"])
        for key, label in (("test__logits", f"ID: held-out {r['domain']}"), ("ood_test__logits", f"open set: {ood}")):
            m, c = parts(arr[key])
            ax.scatter(m, c, s=3, alpha=0.35, label=label)
        ax.set_xlabel("class-agnostic part: mean logit")
        ax.set_ylabel("class-discriminative part")
        ax.set_title(f"{method}, held out {r['domain']}, seed {seed}", fontsize=9)
        ax.legend(fontsize=7, markerscale=3)
    return save(fig, path)
