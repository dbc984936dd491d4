"""Diagnostic plots for OOD evaluation (headless: uses the Agg canvas directly, never pyplot's global state)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import numpy as np

__all__ = ["plot_score_histograms"]


def plot_score_histograms(
    scores: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    title: str | None = None,
    xlabel: str = "energy score (higher = more ID)",
    bins: int = 60,
    density: bool = True,
) -> str:
    """Overlay the score distributions of several sample groups and write them as a PNG.

    All groups share one set of bin edges; each is drawn as a translucent filled histogram plus a solid outline,
    and the legend shows the group size. ``density=True`` (default) normalises each group, since ID and OOD
    sets usually differ in size by orders of magnitude.

    Args:
        scores: ``{label: 1-D scores}``, e.g. ``{"ID (source val)": ..., "closed-set OOD (held-out domain)": ...,
            "open-set OOD: DTD": ...}``.
        path: output PNG path; parent folders are created. Written atomically (temp file + ``os.replace``).
        title: optional figure title.
        xlabel: x-axis label.
        bins: number of shared bins.
        density: plot densities instead of counts.

    Returns:
        The path written, as a string.

    Raises:
        ValueError: if ``scores`` is empty, or a group is empty or has non-finite values.
    """
    if not scores:
        raise ValueError("scores is empty: nothing to plot")
    groups: dict[str, np.ndarray] = {}
    for label, values in scores.items():
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.size == 0:
            raise ValueError(f"score group {label!r} is empty")
        if not np.isfinite(arr).all():
            raise ValueError(f"score group {label!r} contains NaN or inf")
        groups[str(label)] = arr

    edges = np.histogram_bin_edges(np.concatenate(list(groups.values())), bins=bins)

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported on use: it costs ~0.7 s per process
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, arr) in enumerate(groups.items()):
        color = f"C{i % 10}"
        ax.hist(arr, bins=edges, density=density, histtype="stepfilled", alpha=0.3, color=color)
        ax.hist(
            arr,
            bins=edges,
            density=density,
            histtype="step",
            linewidth=1.5,
            color=color,
            label=f"{label} (n={arr.size:,})",
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density else "count")
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize="small", frameon=False)
    fig.tight_layout()

    out = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out
