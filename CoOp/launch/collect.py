"""Collect run records into tables: Markdown on screen, CSV on disk, mean ± std over seeds.

Records (``record.json`` + ``done``) are the only source of numbers; the sweep manifests
(``<root>/sweeps/*.json``) say which runs were planned, so missing ones are listed by name. A record outside any
manifest (a run started by hand) is still collected, labelled by its directory.

* OOD generalisation (``collect_result_set2_oodg.py``): held-out-domain accuracy per domain and the average.
* OOD detection (``collect_result_set2_oodd.py``): FPR95 / AUROC per open-set dataset (percent), one table per
  ``--scores`` entry (any registered score), headed by its FPR95 convention.

``--select auto|official|val|oracle|none`` picks the setting per (method, dataset, held-out domain, seed) (see
:mod:`launch.selection`; ``auto``, the default: ``official`` for runs of the official preset, else ``val``);
``--fpr official`` (default) reports each score's official FPR95 (:data:`dassl.evaluation.ood.FPR95_CONVENTION`).
Above each table: the rule, preset(s), switches off their official value, the FPR95 convention and which model
each row is (per held-out domain and seed where a row mixes settings), read from the run records; under ORACLE the
detection tables also name the units whose accuracy rows come from another model.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from launch import official, setup1
from launch.sweep import COOP_DIR, read_manifests

from dassl.engine.identity import partial_fingerprint  # noqa: E402
from dassl.engine.records import RECORD_FILE, is_done, load_record  # noqa: E402
from dassl.evaluation.ood import canonical_metric, fpr95_convention, metric_value  # noqa: E402
from dassl.evaluation.scores import score_names  # noqa: E402
from launch.selection import AUTO, RULES, oracle_model_gaps, protocol_lines, resolve_rule, select_runs  # noqa: E402

FPR_KEYS = ("fpr95_tpr_id", "fpr95_id_percentile", "fpr95_tpr_ood")
FPR_TEXT = {"fpr95_id_percentile": "CRoFT evaluator's OODD_FPR95: OOD above the 5th percentile of the ID side's "
                                   "scores",
            "fpr95_tpr_id": "OOD accepted at 95 % ID recall, MCM/KNN metric_utils",
            "fpr95_tpr_ood": "ID rejected at 95 % OOD recall, OpenOOD v1.5's evaluator"}
DEFAULT_TABLE_SCORES, DEFAULT_FIGURE_SCORES = ("energy", "knn"), ("energy", "mcm")


def _labels_from_path(root: str, run_dir: str, rec: dict[str, Any]) -> dict[str, Any]:
    """Labels of a run outside any manifest (e.g. made by the shell drivers), equal to the labels the drivers
    give the run of that directory: the trainer config comes from the record's ``--config-file``, the setting is
    the group folder without ``<dataset>_<config>_``."""
    parts = os.path.relpath(run_dir, root).split(os.sep)
    group = parts[1] if len(parts) > 1 else parts[0]
    dataset = rec.get("dataset", "")
    setting = group[len(dataset) + 1:] if group.lower().startswith(dataset.lower() + "_") else group
    cfg = os.path.splitext(os.path.basename(rec.get("args", {}).get("config_file") or ""))[0]
    if cfg and (setting == cfg or setting.startswith(cfg + "_")):
        setting = setting[len(cfg) + 1:]
    else:
        cfg = ""
    env = rec.get("test_env", "")
    domain = env[len("test_on_"):-5] if env.startswith("test_on_") and env.endswith(".json") else env
    return {"trainer": rec.get("trainer"), "method": rec.get("trainer"), "dataset": dataset, "cfg": cfg,
            "setting": setting, "group": group, "domain": domain, "seed": rec.get("seed"), "plan": "manual"}


def _run_shots(rec: dict[str, Any]) -> Optional[int]:
    """Shots of the training run behind a record (an evaluation run's: its model's, from its identity)."""
    if rec.get("mode") != "eval":
        return rec.get("shots")
    model = (rec.get("identity") or {}).get("model") or {}
    return model.get("fingerprinted", {}).get("DATASET", {}).get("NUM_SHOTS")


def shots_label(labels: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """Setup-II labels carry no shots; a run whose shots are not its trainer's official ones gets ``shots`` (its
    own rows and selection units; the tables show ``_shots<K>`` after the setting)."""
    shots = _run_shots(rec)
    if labels.get("shots") is not None or shots is None or shots < 1 or rec.get("dataset") == setup1.TRAIN_DATASET:
        return labels
    official_shots = official.protocol(labels.get("trainer") or rec.get("trainer", ""), 2).shots
    return labels if shots in official_shots else dict(labels, shots=shots)


def plan_labels(job: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """The run's standing against the preset's plan (the manifest's ``plan``, written by the drivers): ``plan`` is
    the preset's name when the record's fingerprint is the preset's run for that directory, else ``not
    <preset>``, the method label gets ``(not <preset> <tag>)`` (a row and selection units of its own; runs
    differing from the preset in the same keys share the tag) and ``plan_note`` names the differing keys (a
    header line of the table). Manifest entries without a plan (written by other tools) keep the
    record's preset."""
    labels = shots_label(dict(job["labels"]), rec)
    plan = job.get("plan")
    if not plan:
        return dict(labels, plan=(rec.get("protocol") or {}).get("preset", "unrecorded"))
    if rec.get("fingerprint") and rec.get("fingerprint") == plan.get("fingerprint"):
        return dict(labels, plan=plan["preset"])
    why = sorted((d for d in plan.get("differences", []) if not d.startswith("not a run")),
                 key=lambda d: next((i for i, k in enumerate(SALIENT) if d.startswith(k)), len(SALIENT)))
    why = why or ["not in its plan"]
    if rec.get("fingerprint") != job.get("fingerprint"):
        why = ["changed since planned"]
    name = f"not {plan['preset']} " + hashlib.sha256("\n".join(why).encode()).hexdigest()[:6]
    method = labels.get("method") or labels.get("trainer")
    return dict(labels, plan=f"not {plan['preset']}", plan_note=[name, "; ".join(why)], method=f"{method} ({name})")


# differences named first in a row's "not <preset>" label
SALIENT = ("OPTIM.MAX_EPOCH", "DATASET.NUM_SHOTS", "MODEL.BACKBONE", "OPTIM.LR", "TRAINER.")
# what varies along a table's columns and seeds; runs equal in everything else belong to one row
ROW_AXES = ("SEED", "TEST_ENV", "TEST_OOD", "DATASET.NAME")
INHERITED = ("plan", "plan_note", "method", "shots", "cfg", "setting")


def row_fingerprint(rec: dict[str, Any]) -> Optional[str]:
    """The record's fingerprint without :data:`ROW_AXES` (plus the ID dataset of an evaluation run); None for
    records written before run identities."""
    ident = rec.get("identity")
    if not ident:
        return None
    return partial_fingerprint(ident, ROW_AXES) + "/" + str(rec.get("dataset", "")).split("_", 1)[0]


def gather(root: str, kind: str) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[str]]:
    """Return (labels, record) pairs of finished runs and the names of planned-but-missing runs. A run outside
    every manifest (by hand, the shell drivers) whose configuration equals a planned run's but for seed and
    domain (:func:`row_fingerprint`) joins that run's row: same labels, same standing against the preset."""
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
            rec = load_record(out)
            runs.append((plan_labels(job, rec), rec))
        else:
            missing.append(job["name"])
    rows = {}
    for lab, rec in runs:
        rows.setdefault(row_fingerprint(rec), {k: lab[k] for k in INHERITED if k in lab})
    rows.pop(None, None)
    if os.path.isdir(root):
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()  # runs by hand: ties between settings go to the first in path order
            if RECORD_FILE in files and os.path.realpath(dirpath) not in seen and is_done(dirpath):
                rec = load_record(dirpath)
                if (rec.get("mode") == "eval") != (kind == "eval"):
                    continue
                seen.add(os.path.realpath(dirpath))
                labels = _labels_from_path(root, dirpath, rec)
                labels = shots_label(_eval_labels(labels, rec) if kind == "eval" else labels, rec)
                runs.append((dict(labels, **rows.get(row_fingerprint(rec), {})), rec))
    return runs, missing


def _eval_labels(labels: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """Dataset, open set and held-out domain (Setup-I: test set) of an evaluation record outside any manifest."""
    name = rec.get("dataset", "")
    if name != setup1.EVAL_DATASET:  # Setup-II: <ID>_<OOD>, the held-out domain from TEST_ENV
        return dict(labels, dataset=name.split("_", 1)[0], ood=name.split("_", 1)[-1])
    model = rec.get("model_dir") or ""
    model = model if not model or os.path.isabs(model) else os.path.join(COOP_DIR, model)
    shots = rec.get("shots") if (rec.get("shots") or -1) >= 1 else None
    if shots is None and model and is_done(model):  # evaluation runs pass no NUM_SHOTS: the model's shots
        shots = load_record(model).get("shots")
    setting = labels["setting"] + (f"_shots{shots}" if shots is not None else "")
    return dict(labels, dataset=setup1.TRAIN_DATASET, ood=setup1.OOD_LABEL, domain=rec["config"].get("TEST_OOD", ""),
                shots=shots, setting=setting, train_dir=model)


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
    shots = f"shots{lab['shots']}" if lab.get("shots") is not None else ""
    if shots and not setting.endswith(shots):  # shots always show when a row's runs carry them
        setting = "_".join(x for x in (setting, shots) if x)
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
    rule = resolve_rule(runs, select)
    runs, notes = select_runs(runs, rule)
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
        out += protocol_lines([r for r in runs if r[0]["dataset"] == ds], rule, auto=select == AUTO)
        if rule == "oracle":
            out.append("> ORACLE picks per held-out domain / test set and seed by accuracy; detection tables pick by "
                       "AUROC and name the units where that is another model than here")
        out += [""]
        out.append(markdown(["method", "setting", *domains, "Avg", "seeds"], rows) + "\n")
    write_csv(csv_path, ["dataset", "method", "setting", "domain", "accuracy_mean", "accuracy_std", "n", "selection"],
              [r + [rule] for r in csv_rows])
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
    rule = resolve_rule(runs, select)
    everything = runs
    runs, notes = select_runs(runs, rule, score=scores[0] if scores else None)
    # (dataset) -> (method, setting, score) -> ood -> seed -> domain -> (fpr, auroc)
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(dict))))
    for lab, rec in runs:
        det = rec.get("metrics", {}).get("ood", {})
        for score in scores:
            if score in det:
                m = det[score]
                key = fpr95_convention(score) if fpr_key == "official" else fpr_key
                table[lab["dataset"]][(*row_key(lab), score)][lab["ood"]][int(lab["seed"])][lab["domain"]] = (
                    100 * metric_value(m, key), 100 * m["auroc"])
    out, csv_rows = [], []
    for ds in sorted(table):
        oods = sorted({o for r in table[ds].values() for o in r})
        rows: dict[str, list[list[str]]] = defaultdict(list)
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
            rows[score].append([method, setting or "-", score, *cells])
        header = ["method", "setting", "score"]
        for ood in oods + ["Avg"]:
            header += [f"{ood} FPR95↓", f"{ood} AUROC↑"]
        out.append(f"### {ds} as ID: open-set detection (%), mean ± std over seeds "
                   f"(each seed averaged over held-out domains)\n")
        out += protocol_lines([r for r in runs if r[0]["dataset"] == ds], rule, fpr_text(scores, fpr_key),
                              auto=select == AUTO)
        if rule == "oracle":
            out += oracle_model_gaps([r for r in everything if r[0]["dataset"] == ds], scores[0] if scores else None)
        out += [""]
        for score in [s for s in scores if rows[s]]:  # one table per score, in the requested order
            key = fpr95_convention(score) if fpr_key == "official" else fpr_key
            out.append(f"#### score `{score}`: FPR95 = `{key}` ({FPR_TEXT[key]})\n")
            out.append(markdown(header, rows[score]) + "\n")
    out += notes
    write_csv(csv_path, ["dataset", "method", "setting", "score", "ood", "metric", "mean", "std", "n", "selection",
                         "fpr95"], [r + [rule, fpr95_convention(r[3]) if fpr_key == "official" else fpr_key]
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
        p.add_argument("--scores", nargs="+", default=None, choices=score_names(),
                       help="any registered score (dassl.evaluation.scores), one table each (default: energy knn; "
                            "figures: energy mcm)")
        p.add_argument("--fpr", choices=("official",) + FPR_KEYS, type=canonical_metric, default="official",
                       help="FPR95 convention (default official: energy fpr95_id_percentile, knn fpr95_tpr_id, "
                            "OpenOOD's scores fpr95_tpr_ood, others fpr95_tpr_id)")
        p.add_argument("--plots", default="", help="also write the sweep's figures (launch/figures.py) into DIR: "
                       "histograms and ROC curves per --scores entry")
    p.add_argument("--select", choices=(AUTO,) + RULES, default=AUTO,
                   help="model selection: official (the models the official scripts evaluate), val (best "
                        "source-domain validation accuracy), oracle (best test result, optimistic), none (every "
                        "setting a row); default auto: official when every run is of --preset official, else val")
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
        text = collect_oodd(root, csv_path, args.scores or DEFAULT_TABLE_SCORES, args.fpr,
                            only_domains=None if setup == 2 else ("test_id",), select=args.select)
        if args.plots:
            from launch import figures, results

            written = figures.plot_sweep(results.rows(root), args.plots,
                                         scores=args.scores or DEFAULT_FIGURE_SCORES)
            text += "\n" + "\n".join(f"figure written: {path}" for path in written.values())
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "oodg", sys.argv[2:]))
