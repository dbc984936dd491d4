"""The demo's report: the verdict with its effect sizes, tables (accuracy, every OOD score, paired differences,
the lambda2 grid) and figures, as one Markdown section (printed; ``--readme`` writes it into docs/demo.md between
the demo markers), and from the same numbers the README's headline (``--headline``, between the headline
markers)."""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from dassl.evaluation.ood import fpr95_convention
from demo import effects, investigate, selection, tables, verdict
from launch import figures, results

SCORE_NAMES = {"energy": "energy", "mcm": "MCM", "msp": "MSP", "knn": "KNN", "gl_mcm": "GL-MCM"}
BEGIN, END = "<!-- demo:start -->", "<!-- demo:end -->"
SECTION = (BEGIN, END)  # docs/demo.md: the whole generated section
HEADLINE = ("<!-- headline:start -->", "<!-- headline:end -->")  # README.md: table, figure, verdict


def claim_units(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """metric -> method -> (domain, seed) -> value, for the metrics of the claim."""
    return {k: tables.per_unit(rows, k) for k, _, _ in verdict.CLAIM_METRICS}


def baselines(rows: list[dict[str, Any]]) -> list[str]:
    """The methods the claim compares CRoFT with: every method whose label does not start with "CRoFT"."""
    return [m for m in dict.fromkeys(r["method"] for r in rows) if not m.startswith("CRoFT")]


def summary(rows: list[dict[str, Any]], ref: str = "CRoFT") -> str:
    """The verdict line, the effect sizes behind it (paired mean differences with 95 % intervals) and what the
    benchmark can and cannot say."""
    found = verdict.claim_effects(claim_units(rows), ref, baselines(rows))
    if len(found) < len(verdict.CLAIM_METRICS):
        return f"_No verdict: {ref} or the baselines have no finished runs._"
    return (f"{verdict.verdict_line(found, ref)}\n\n**Effect sizes** ({ref} with λ2 chosen on source-domain "
            f"validation accuracy, against the best baseline on each metric; Student-t intervals over the held-out "
            f"domain x seed pairs): {verdict.effects_text(found)} It is a tiny CLIP pretrained on digits for this "
            "demo, with 32 px images and 16 shots; it tests the code path and the direction of effects, not the "
            "paper's effect sizes on PACS/VLCS with OpenAI CLIP.")


def grid_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of swept methods (several settings), relabelled "<method> λ2=<v>" for the grid table."""
    settings: dict[str, set] = {}
    for r in rows:
        settings.setdefault(r["method"], set()).add(r["setting"])
    out = []
    for r in rows:
        if len(settings[r["method"]]) > 1:
            out.append(dict(r, method=f"{r['method']} λ2={figures.param_value(r['setting'], 'lambda2'):g}"))
    return sorted(out, key=lambda r: (r["method"].split(" λ2=")[0], float(r["method"].split("λ2=")[1])))


def _dec_means(dec: list[dict[str, Any]], method: str, ood: str) -> dict[str, dict[str, float]]:
    """held-out domain -> mean over seeds of each decomposition number of ``method`` against ``ood``."""
    doms = dict.fromkeys(d["domain"] for d in dec if d["method"] == method and d["ood"] == ood)
    return {dom: {k: float(np.mean([d[k] for d in dec if d["method"] == method and d["ood"] == ood
                                    and d["domain"] == dom])) for k in ("energy", "agnostic", "discriminative", "spread")}
            for dom in doms}


def coop_finding(rows: list[dict[str, Any]], fig_dir: str, fig_ref: str) -> list[str]:
    """The energy-decomposition table for every method against the first open set, and CoOp's figure."""
    oods = list(dict.fromkeys(r["ood"] for r in rows))
    if not oods:
        return []
    dec = investigate.decompose([r for r in rows if r["ood"] == oods[0]])  # the table and figure: first open set
    out = [f"#### Why energy can rank {oods[0]} above held-out ID images: AUROC (%) of energy / its class-agnostic "
           f"part (mean logit) / its class-discriminative part (logsumexp of centred logits), vs {oods[0]}\n",
           investigate.table(dec, oods[0]), ""]
    coop = [d for d in dec if d["method"] == "CoOp" and d["ood"] == oods[0]]
    if coop:
        mean = _dec_means(dec, "CoOp", oods[0])
        lo, hi = min(mean, key=lambda d: mean[d]["energy"]), max(mean, key=lambda d: mean[d]["energy"])
        zs = _dec_means(dec, "ZS-CLIP", oods[0]).get(lo)
        out.append(f"For CoOp, energy AUROC against {oods[0]} is {mean[lo]['energy']:.1f} % with {lo} held out and "
                   f"{mean[hi]['energy']:.1f} % with {hi}. Split into its two parts, the class-agnostic part gives "
                   f"{mean[lo]['agnostic']:.1f} % / {mean[hi]['agnostic']:.1f} % and the class-discriminative part "
                   f"{mean[lo]['discriminative']:.1f} % / {mean[hi]['discriminative']:.1f} %. "
                   + (f"With {lo} held out, the open-set images lie closer to the classes' common "
                      f"text direction than the held-out digits"
                      + (f" for ZS-CLIP as well (class-agnostic AUROC {zs['agnostic']:.1f} %)" if zs else "")
                      + f", while the class-discriminative part ranks them correctly; the spread of the class-agnostic "
                      f"part relative to the discriminative part is {mean[lo]['spread']:.2f} for CoOp"
                      + (f" against {zs['spread']:.2f} for ZS-CLIP" if zs else "")
                      + ", so CoOp's energy follows the class-agnostic part. It is a property of the energy score on "
                      "this model and data, not a bookkeeping bug: the discriminative part of the same logits "
                      "separates the open set."
                      if mean[lo]["agnostic"] < 50 <= mean[lo]["discriminative"] else
                      "The class-agnostic part does not explain the pattern alone here; see the figure."))
        png = investigate.figure(rows, "CoOp", [lo, hi], oods[0], os.path.join(fig_dir, "coop_energy_parts.png"))
        if png:
            out += ["", f"![CoOp energy parts]({fig_ref}/coop_energy_parts.png)"]
    return out


def effects_figure(rows: list[dict[str, Any]], fig_dir: str, ref: str = "CRoFT") -> Optional[str]:
    """``effects.png``: ``ref`` minus every other method (baselines and the other CRoFT variants) per claim metric."""
    others = [m for m in dict.fromkeys(r["method"] for r in rows) if m != ref]
    by = effects.effects_by_baseline(claim_units(rows), ref, others)
    return effects.figure(by, os.path.join(fig_dir, "effects.png")) if any(by.values()) else None


HEADLINE_COLUMNS = [("acc", "held-out accuracy %"), ("energy_fpr95", "energy FPR95 %"),
                    ("energy_auroc", "energy AUROC %"), ("mcm_fpr95", "MCM FPR95 %"),
                    ("gl_mcm_fpr95", "GL-MCM FPR95 %")]


def headline(chosen: list[dict[str, Any]], domains: list[str], fig_ref: str, verdict_text: str) -> str:
    """The README's headline: one table (averages over the held-out domains), the effect-size figure, the verdict."""
    cols = [(k, lab) for k, lab in HEADLINE_COLUMNS if any(r.get(k) is not None for r in chosen)]
    n = len({(r["domain"], r["seed"]) for r in chosen})
    return "\n".join([
        f"`make demo` runs Setup-II on DigitsDG-mini with a tiny CLIP on CPU: {len(domains)} held-out domain"
        f"{'s' if len(domains) != 1 else ''} x {n // max(1, len(domains))} seeds. Average over the held-out domains "
        "(mean ± std over seeds; FPR95 against both open sets; every table in [docs/demo.md](docs/demo.md)):", "",
        tables.average_table(chosen, cols, domains), "",
        f"![effect sizes]({fig_ref}/effects.png)", "", verdict_text])


def build(demo_root: str, fig_dir: str, fig_ref: str, select: str = "val", header: str = "",
          head_ref: Optional[str] = None) -> tuple[str, str]:
    """(the whole demo section, the headline) as Markdown from the finished runs under ``demo_root``; figures go
    to ``fig_dir`` and are referenced as ``fig_ref/<name>.png`` (``head_ref/<name>.png`` in the headline)."""
    rows = results.rows(os.path.join(demo_root, "eval_open_ood"))
    if not rows:
        return header + "\n_No finished evaluation runs._\n", "_No finished demo runs._\n"
    chosen = selection.select(rows, select)
    domains = sorted({r["domain"] for r in rows})
    verdict_text = summary(chosen)
    os.makedirs(fig_dir, exist_ok=True)
    eff_png = effects_figure(chosen, fig_dir)
    out = [header, verdict_text, ""]
    if eff_png:
        out += [f"![effect sizes]({fig_ref}/effects.png)", ""]
    out += [f"#### Held-out-domain accuracy (%), mean ± std over seeds (grid methods: λ2 selected by {select})\n",
            tables.by_domain_table(chosen, ["acc"], domains), ""]
    for score, name in SCORE_NAMES.items():
        if any(f"{score}_auroc" in r for r in chosen):
            out += [f"#### Open-set detection with the {name} score: FPR95 ({fpr95_convention(score)}) / AUROC (%), "
                    "averaged over the open sets\n",
                    tables.by_domain_table(chosen, [f"{score}_fpr95", f"{score}_auroc"], domains), ""]
    metrics = [("acc", "accuracy"), ("energy_fpr95", "energy FPR95"), ("mcm_fpr95", "MCM FPR95")]
    for ref in ("CRoFT", "CRoFT (fixed)"):
        t = tables.paired_table(chosen, ref, metrics)
        if t:
            out += [f"#### Paired differences {ref} − method over held-out domain x seed pairs (mean [95 % "
                    "Student-t interval], points)\n", t, ""]
    grid = grid_rows(rows)
    if grid:
        out += ["#### The λ2 grid (every setting, before selection): accuracy and MCM FPR95 / AUROC\n",
                tables.by_domain_table(grid, ["acc"], domains), "",
                tables.by_domain_table(grid, ["mcm_fpr95", "mcm_auroc"], domains), ""]
    figs = figures.plot_sweep(rows, fig_dir, chosen)
    for name, path in figs.items():
        out.append(f"![{name}]({fig_ref}/{os.path.basename(path)})")
    out += ["", *coop_finding(chosen, fig_dir, fig_ref)]
    head = headline(chosen, domains, head_ref if head_ref is not None else fig_ref, verdict_text)
    return "\n".join(out) + "\n", head + "\n"


def check_markers(path: str, markers: tuple[str, str] = SECTION, flag: str = "") -> None:
    """One clear error (naming ``flag`` and ``path``) unless ``path`` is a file holding ``markers`` in order."""
    begin, end = markers
    where = f"{flag} {path}" if flag else path
    if not os.path.isfile(path):
        raise SystemExit(f"error: {where}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        raise SystemExit(f"error: {where} lacks the markers {begin} ... {end}")


def write_between_markers(readme: str, text: str, markers: tuple[str, str] = SECTION) -> None:
    """Replace what lies between ``markers`` of ``readme`` (both must be present) with ``text``."""
    from dassl.utils.tools import atomic_write_text

    check_markers(readme, markers)
    begin, end = markers
    with open(readme, encoding="utf-8") as f:
        old = f.read()
    head, rest = old.split(begin, 1)
    atomic_write_text(readme, head + begin + "\n" + text.rstrip("\n") + "\n" + end + rest.split(end, 1)[1])
