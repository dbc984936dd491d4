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
    from matplotlib.patches import StepPatch

    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    # fixed margins (tight_layout would draw the figure once more); tick labels stay short (scientific notation
    # with the exponent above the axis beyond 1e-3 .. 1e4), so they fit
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.11, top=0.9 if title else 0.94)
    ax = fig.add_subplot(1, 1, 1)
    top = 0.0
    for i, (label, arr) in enumerate(groups.items()):
        color = f"C{i % 10}"
        heights, _ = np.histogram(arr, bins=edges, density=density)  # what ax.hist draws, as two step patches
        top = max(top, float(heights.max()))
        ax.add_artist(StepPatch(heights, edges, fill=True, alpha=0.3, color=color, linewidth=0))
        ax.add_artist(StepPatch(heights, edges, fill=False, linewidth=1.5, color=color,
                                label=f"{label} (n={arr.size:,})"))
    pad = 0.05 * (edges[-1] - edges[0])  # the limits autoscaling would set (5 % margins, the bars on y = 0)
    ax.set_xlim(edges[0] - pad, edges[-1] + pad)
    ax.set_ylim(0.0, 1.05 * top if top > 0 else 1.0)
    ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 4))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density else "count")
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize="small", frameon=False)

    out = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", pil_kwargs={"compress_level": 1})  # fast zlib level
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out
