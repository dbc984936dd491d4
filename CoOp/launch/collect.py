"""Collect run records into tables: Markdown on screen, CSV on disk, mean ± std over seeds.

Records (``record.json`` + ``done``) are the only source of numbers; the sweep manifests
(``<root>/sweeps/*.json``) say which runs were planned, so missing ones are listed by name. A record outside any
manifest (a run started by hand) is still collected, labelled by its directory.

* OOD generalisation (``collect_result_set2_oodg.py``): held-out-domain accuracy per domain and the average.
* OOD detection (``collect_result_set2_oodd.py``): FPR95 / AUROC per open-set dataset and score (percent).

``--select val|oracle|none`` picks the setting per (method, dataset, held-out domain, seed) (see
:mod:`launch.selection`); ``--fpr official`` (default) reports each score's official FPR95
(:data:`dassl.evaluation.ood.FPR95_CONVENTION`). Above each table: the rule, preset(s), switches off their official
value and the FPR95 convention, read from the run records.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from launch.sweep import COOP_DIR, read_manifests

from dassl.engine.records import RECORD_FILE, is_done, load_record  # noqa: E402
from dassl.evaluation.ood import fpr95_convention  # noqa: E402
from dassl.evaluation.scores import score_names  # noqa: E402
from launch.selection import RULES, protocol_lines, select_runs  # noqa: E402

FPR_KEYS = ("fpr95_tpr_id", "fpr95_val_threshold", "fpr95_tpr_ood")


def _labels_from_path(root: str, run_dir: str, rec: dict[str, Any]) -> dict[str, Any]:
    parts = os.path.relpath(run_dir, root).split(os.sep)
    group = parts[1] if len(parts) > 1 else parts[0]
    dataset = rec.get("dataset", "")
    setting = group[len(dataset) + 1:] if group.startswith(dataset + "_") else group
    env = rec.get("test_env", "")
    domain = env[len("test_on_"):-5] if env.startswith("test_on_") and env.endswith(".json") else env
    return {"trainer": rec.get("trainer"), "method": rec.get("trainer"), "dataset": dataset, "cfg": "",
            "setting": setting, "group": group, "domain": domain, "seed": rec.get("seed")}


def gather(root: str, kind: str) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[str]]:
    """Return (labels, record) pairs of finished runs and the names of planned-but-missing runs."""
    planned = [j for j in read_manifests(root) if j["labels"].get("kind") == kind]
    runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    missing: list[str] = []
    seen: set[str] = set()
    for job in planned:
        out = job["output_dir"] if os.path.isabs(job["output_dir"]) else os.path.join(COOP_DIR, job["output_dir"])
        key = os.path.realpath(out)
        if key in seen:
            continue
        seen.add(key)
        if is_done(out):
            runs.append((job["labels"], load_record(out)))
        else:
            missing.append(job["name"])
    if os.path.isdir(root):
        for dirpath, _, files in os.walk(root):
            if RECORD_FILE in files and os.path.realpath(dirpath) not in seen and is_done(dirpath):
                rec = load_record(dirpath)
                if (rec.get("mode") == "eval") != (kind == "eval"):
                    continue
                seen.add(os.path.realpath(dirpath))
                labels = _labels_from_path(root, dirpath, rec)
                if kind == "eval":
                    labels["ood"] = rec.get("dataset", "").split("_", 1)[-1]
                    labels["dataset"] = rec.get("dataset", "").split("_", 1)[0]
                runs.append((labels, rec))
    return runs, missing


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=0)) if len(arr) > 1 else 0.0


def cell(values: Sequence[float]) -> str:
    if not len(values):
        return "–"
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}" if len(values) > 1 else f"{m:.2f}"


def row_key(lab: dict[str, Any]) -> tuple[str, str]:
    setting = "_".join(x for x in (lab.get("cfg", ""), lab.get("setting", "")) if x)
    return lab.get("method") or lab.get("trainer"), setting


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: str, header: list[str], rows: Iterable[list[Any]]) -> None:
    from dassl.utils.tools import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def collect_oodg(root: str, csv_path: str, kind: str = "train", avg_exclude: Sequence[str] = (),
                 title: str = "held-out-domain accuracy", select: str = "val") -> str:
    """Accuracy per domain / test set (columns) and its average over the columns not in ``avg_exclude``."""
    runs, missing = gather(root, kind)
    runs, notes = select_runs(runs, select)
    by_ds: dict[str, dict[tuple, dict[str, dict[int, float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for lab, rec in runs:
        acc = rec.get("metrics", {}).get("test", {}).get("accuracy")
        if acc is not None:
            by_ds[lab["dataset"]][row_key(lab)][lab["domain"]][int(lab["seed"])] = float(acc)
    out, csv_rows = [], []
    for ds in sorted(by_ds):
        domains = sorted({d for r in by_ds[ds].values() for d in r})
        rows = []
        for (method, setting), per_dom in by_ds[ds].items():  # planned (manifest) order
            seeds = sorted({s for d in per_dom.values() for s in d})
            cells = [cell(list(per_dom.get(d, {}).values())) for d in domains]
            avg_doms = [d for d in domains if d not in avg_exclude]
            complete = [s for s in seeds if all(s in per_dom.get(d, {}) for d in avg_doms)]
            avg = [float(np.mean([per_dom[d][s] for d in avg_doms])) for s in complete] if avg_doms else []
            rows.append([method, setting or "-", *cells, cell(avg), str(len(complete))])
            for d in domains:
                vals = list(per_dom.get(d, {}).values())
                if vals:
                    m, s = mean_std(vals)
                    csv_rows.append([ds, method, setting, d, f"{m:.4f}", f"{s:.4f}", len(vals)])
            if avg:
                m, s = mean_std(avg)
                csv_rows.append([ds, method, setting, "Avg", f"{m:.4f}", f"{s:.4f}", len(avg)])
        out.append(f"### {ds}: {title} (%), mean ± std over seeds\n")
        out += protocol_lines([r for r in runs if r[0]["dataset"] == ds], select) + [""]
        out.append(markdown(["method", "setting", *domains, "Avg", "seeds"], rows) + "\n")
    write_csv(csv_path, ["dataset", "method", "setting", "domain", "accuracy_mean", "accuracy_std", "n", "selection"],
              [r + [select] for r in csv_rows])
    return _finish(out + notes, missing, csv_path)


def fpr_text(scores: Sequence[str], fpr_key: str) -> str:
    """Header text of the FPR95 convention in force (``official``: each score's official table's)."""
    if fpr_key != "official":
        return f"{fpr_key} for every score"
    return ", ".join(f"{s} → {fpr95_convention(s)}" for s in scores) + " (official convention per score)"


def collect_oodd(root: str, csv_path: str, scores: Sequence[str], fpr_key: str = "official",
                 only_domains: Optional[Sequence[str]] = None, select: str = "val") -> str:
    """FPR95 / AUROC per open-set dataset; ``fpr_key`` ``official`` = each score's official FPR95 convention."""
    runs, missing = gather(root, "eval")
    if only_domains is not None:
        runs = [(lab, rec) for lab, rec in runs if lab["domain"] in only_domains]
    runs, notes = select_runs(runs, select, score=scores[0] if scores else None)
    # (dataset) -> (method, setting, score) -> ood -> seed -> domain -> (fpr, auroc)
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(dict))))
    for lab, rec in runs:
        det = rec.get("metrics", {}).get("ood", {})
        for score in scores:
            if score in det:
                m = det[score]
                key = fpr95_convention(score) if fpr_key == "official" else fpr_key
                table[lab["dataset"]][(*row_key(lab), score)][lab["ood"]][int(lab["seed"])][lab["domain"]] = (
                    100 * m[key], 100 * m["auroc"])
    out, csv_rows = [], []
    for ds in sorted(table):
        oods = sorted({o for r in table[ds].values() for o in r})
        rows = []
        for (method, setting, score), per_ood in table[ds].items():  # planned (manifest) order
            cells, avg_f, avg_a = [], defaultdict(list), defaultdict(list)
            for ood in oods:
                per_seed = per_ood.get(ood, {})
                f = [float(np.mean([v[0] for v in doms.values()])) for doms in per_seed.values()]
                a = [float(np.mean([v[1] for v in doms.values()])) for doms in per_seed.values()]
                cells += [cell(f), cell(a)]
                for seed, doms in per_seed.items():
                    avg_f[seed].append(float(np.mean([v[0] for v in doms.values()])))
                    avg_a[seed].append(float(np.mean([v[1] for v in doms.values()])))
                for name, vals in (("fpr95", f), ("auroc", a)):
                    if vals:
                        m, s = mean_std(vals)
                        csv_rows.append([ds, method, setting, score, ood, name, f"{m:.4f}", f"{s:.4f}", len(vals)])
            full = [s for s in avg_f if len(avg_f[s]) == len(oods)]
            cells += [cell([np.mean(avg_f[s]) for s in full]), cell([np.mean(avg_a[s]) for s in full])]
            rows.append([method, setting or "-", score, *cells])
        header = ["method", "setting", "score"]
        for ood in oods + ["Avg"]:
            header += [f"{ood} FPR95↓", f"{ood} AUROC↑"]
        out.append(f"### {ds} as ID: open-set detection (%), mean ± std over seeds "
                   f"(each seed averaged over held-out domains)\n")
        out += protocol_lines([r for r in runs if r[0]["dataset"] == ds], select, fpr_text(scores, fpr_key)) + [""]
        out.append(markdown(header, rows) + "\n")
    out += notes
    write_csv(csv_path, ["dataset", "method", "setting", "score", "ood", "metric", "mean", "std", "n", "selection",
                         "fpr95"], [r + [select, fpr95_convention(r[3]) if fpr_key == "official" else fpr_key]
                                    for r in csv_rows])
    return _finish(out, missing, csv_path)


def _finish(out: list[str], missing: list[str], csv_path: str) -> str:
    if not out:
        out.append("No finished runs found.\n")
    if missing:
        out.append(f"Missing runs ({len(missing)}):")
        out += [f"  - {m}" for m in missing[:50]]
        if len(missing) > 50:
            out.append(f"  ... and {len(missing) - 50} more")
    out.append(f"\nCSV written to {csv_path}")
    return "\n".join(out)


def main(kind: str, argv: Optional[Sequence[str]] = None, setup: int = 2) -> int:
    what = "OOD detection" if kind == "oodd" else "OOD generalisation"
    p = argparse.ArgumentParser(description=f"Collect Setup-{'I' * setup} {what} results")
    default_root = ("eval_open_ood" if kind == "oodd" else "output") if setup == 2 else "eval_setup1"
    p.add_argument("--root", default=default_root, help="sweep output root (relative to CoOp/)")
    p.add_argument("--csv", default="", help=f"CSV path (default: <root>/setup{setup}_<kind>.csv)")
    if kind == "oodd":
        p.add_argument("--scores", nargs="+", default=["energy", "knn"], choices=score_names(),
                       help="scores of the registry (dassl.evaluation.scores)")
        p.add_argument("--fpr", choices=("official",) + FPR_KEYS, default="official",
                       help="FPR95 convention (default official: energy fpr95_val_threshold, knn fpr95_tpr_id)")
        p.add_argument("--plots", default="", help="also write the sweep's figures (launch/figures.py) into DIR")
    p.add_argument("--select", choices=RULES, default="val",
                   help="model selection: val (best source-domain validation accuracy, default), oracle (best "
                        "test result, optimistic) or none (every setting a row)")
    args = p.parse_args(argv)
    root = args.root if os.path.isabs(args.root) else os.path.join(COOP_DIR, args.root)
    csv_path = args.csv or os.path.join(root, f"setup{setup}_{kind}.csv")
    if kind == "oodg" and setup == 2:
        text = collect_oodg(root, csv_path, select=args.select)
    elif kind == "oodg":
        text = collect_oodg(root, csv_path, kind="eval", avg_exclude=("test_id",),
                            title="accuracy on ImageNet (test_id) and its variants (Avg = variants)",
                            select=args.select)
    else:
        text = collect_oodd(root, csv_path, args.scores, args.fpr, only_domains=None if setup == 2 else ("test_id",),
                            select=args.select)
        if args.plots:
            from launch import figures, results

            written = figures.plot_sweep(results.rows(root), args.plots)
            text += "\n" + "\n".join(f"figure written: {path}" for path in written.values())
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "oodg", sys.argv[2:]))
