"""The effect-size figure of the demo: per other method, CRoFT minus that method (mean over held-out domain x seed
pairs, 95 % Student-t interval), one panel per metric of the claim, with the verdict's ±margin band."""
from __future__ import annotations

from typing import Sequence

from demo.verdict import CLAIM_METRICS, LEVEL, MARGIN, paired_effect


def effects_by_baseline(units: dict[str, dict[str, dict]], ref: str, baselines: Sequence[str],
                        metrics: Sequence[tuple[str, str, bool]] = CLAIM_METRICS) -> dict[str, list]:
    """metric label -> the :class:`demo.verdict.Effect` of ``ref`` against each baseline with runs."""
    out: dict[str, list] = {}
    for metric, label, higher_better in metrics:
        per = units.get(metric, {})
        if per.get(ref):
            out[label] = [paired_effect(per[ref], per[b], metric, label, higher_better, ref, b)
                          for b in baselines if per.get(b)]
    return out


def figure(effects: dict[str, list], path: str, margin: float = MARGIN) -> str:
    """Forest plot: one row per baseline, the mean difference and its interval, the ±margin band shaded."""
    from matplotlib.figure import Figure

    from launch.figures import save

    panels = [(label, effs) for label, effs in effects.items() if effs]
    n = max((len(e) for _, e in panels), default=1)
    fig = Figure(figsize=(4.4 * max(1, len(panels)), 0.42 * n + 1.3), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (label, effs) in zip(axes, panels):
        ys = list(range(len(effs)))[::-1]
        for y, e in zip(ys, effs):
            ax.plot([e.lo, e.hi], [y, y], color="tab:blue", lw=2)
            ax.plot([e.mean], [y], "o", color="tab:blue")
        ax.axvspan(-margin, margin, color="0.85", zorder=0)
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_yticks(ys, [e.other for e in effs], fontsize=8)
        sign = ">" if effs[0].higher_better else "<"
        ax.set_xlabel(f"{effs[0].ref} − method (points; {sign} 0: {effs[0].ref} better; grey: ±{margin:g})",
                      fontsize=8)
        ax.set_title(f"{label}: mean, {100 * LEVEL:.0f} % interval over {effs[0].n} pairs", fontsize=9)
    return save(fig, path)
