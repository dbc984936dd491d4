"""Model selection for the collected tables and the protocol lines printed above each table.

Rules (``--select``):

* ``val``: per (method, config, shots, dataset, held-out domain, seed) the setting whose training run
  has the best source-domain validation accuracy (DomainBed's training-domain validation; the accuracy the
  trainer used to pick its best epoch); ties go to the first planned setting. Tables then average the chosen
  runs over seeds. No test data is looked at.
* ``oracle``: the same units, the setting with the best test result (held-out accuracy; mean AUROC of the first
  score for detection tables). Optimistic, labelled as such.
* ``none``: every setting is its own row (what a sweep trained, no selection).
* ``official``: the model the official scripts evaluate, where they fix one (:func:`launch.official.selected`:
  CRoFT Setup-II, the models of the official open-set scripts); a unit without a run of that model falls back to
  ``val`` (named in the notes); a trainer without an official model keeps every setting as a row (e.g. CRoFT
  Setup-I, whose official scripts evaluate all 25 λ pairs).
* ``auto`` (the collectors' default): ``official`` when every run of the table is of the official preset
  (:func:`run_preset`), else ``val``; the header names the rule that ran.

Each kept run's labels get ``model``: the setting that produced it, so headers can say which model each row is
(:func:`model_lines`).
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Any, Callable, Optional

from dassl.engine.records import is_done, load_record
from launch import official
from launch.sweep import COOP_DIR

RULES = ("val", "oracle", "none", "official")
AUTO = "auto"
RULE_TEXT = {
    "val": "val (per method, dataset, held-out domain and seed: the setting with the best source-domain validation "
           "accuracy; then mean ± std over seeds)",
    "oracle": "ORACLE (per method, dataset, held-out domain and seed: the setting with the best TEST result; "
              "optimistic, not a valid model selection)",
    "none": "none (every trained setting is a row)",
    "official": "official (the model the official scripts evaluate: {models}; per held-out domain and seed; "
                "trainers without one: every setting is a row)",
}
Run = tuple[dict[str, Any], dict[str, Any]]


def _shots_suffix(lab: dict[str, Any]) -> str:
    return f"_shots{lab['shots']}" if lab.get("shots") is not None else ""


def _setting(lab: dict[str, Any]) -> str:
    """The swept setting of a run without the shot count (Setup-I labels append it)."""
    s, suffix = lab.get("setting", ""), _shots_suffix(lab)
    if suffix and s == suffix[1:]:
        return ""
    return s[: -len(suffix)] if suffix and s.endswith(suffix) else s


def _with_shots(setting: str, lab: dict[str, Any]) -> str:
    return "_".join(x for x in (setting, _shots_suffix(lab)[1:]) if x)


def _unit(lab: dict[str, Any]) -> tuple:
    return (lab.get("method") or lab.get("trainer"), lab.get("cfg", ""), lab.get("shots"), lab.get("dataset"),
            lab.get("domain"), lab.get("seed"))


_VAL_CACHE: dict[str, Optional[float]] = {}


def val_accuracy(lab: dict[str, Any], rec: dict[str, Any]) -> Optional[float]:
    """Source-domain validation accuracy of the training run behind a record (train or evaluation)."""
    if rec.get("mode") != "eval":
        return rec.get("metrics", {}).get("val", {}).get("best_accuracy")
    train_dir = lab.get("train_dir") or rec.get("model_dir") or ""
    if train_dir and not os.path.isabs(train_dir):
        train_dir = os.path.join(COOP_DIR, train_dir)
    if train_dir not in _VAL_CACHE:
        _VAL_CACHE[train_dir] = (load_record(train_dir).get("metrics", {}).get("val", {}).get("best_accuracy")
                                 if train_dir and is_done(train_dir) else None)
    return _VAL_CACHE[train_dir]


def test_objective(score: Optional[str]) -> Callable[[list[Run]], Optional[float]]:
    """Oracle objective: held-out accuracy (``score`` None) or the mean AUROC of ``score`` over the runs."""
    def objective(runs: list[Run]) -> Optional[float]:
        vals = []
        for _, rec in runs:
            m = rec.get("metrics", {})
            v = m.get("test", {}).get("accuracy") if score is None else m.get("ood", {}).get(score, {}).get("auroc")
            if v is not None:
                vals.append(float(v))
        return sum(vals) / len(vals) if vals else None
    return objective


def official_text() -> str:
    """The official models of :mod:`launch.official`, for the rule's header line."""
    parts = []
    for (trainer, setup), prot in sorted(official.OFFICIAL.items()):
        for dataset, per_cfg in prot.selected.items():
            tags = sorted({m.tag for m in per_cfg.values()})
            parts.append(f"{trainer} Setup-{'I' * setup} {dataset} {' / '.join(tags)}")
    return "; ".join(parts) or "none"


def resolve_rule(runs: list[Run], rule: str) -> str:
    """``auto`` -> ``official`` when every run's preset (:func:`run_preset`) is ``official``, else ``val``; other
    rules unchanged."""
    if rule != AUTO:
        return rule
    presets = {run_preset(lab, rec) for lab, rec in runs}
    return "official" if presets == {"official"} else "val"


_TRAIN_CACHE: dict[tuple[str, float], dict[str, Any]] = {}


def training_record(lab: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """The record of the training run behind ``rec`` (itself for a training record; {} when not found)."""
    if rec.get("mode") != "eval":
        return rec
    train_dir = lab.get("train_dir") or rec.get("model_dir") or ""
    if train_dir and not os.path.isabs(train_dir):
        train_dir = os.path.join(COOP_DIR, train_dir)
    if not train_dir or not is_done(train_dir):
        return {}
    key = (train_dir, os.path.getmtime(os.path.join(train_dir, "record.json")))
    if key not in _TRAIN_CACHE:
        _TRAIN_CACHE[key] = load_record(train_dir)
    return _TRAIN_CACHE[key]


def official_models(lab: dict[str, Any]) -> list[official.Setting]:
    """The models the official Setup-II scripts evaluate for this run's trainer, dataset and config (any config
    of the dataset when the run has no config label, e.g. a run made by hand)."""
    trainer = lab.get("trainer") or lab.get("method") or ""
    per_cfg = official.protocol(trainer, 2).selected.get(lab.get("dataset") or "", {}) \
        if (trainer, 2) in official.OFFICIAL else {}
    cfg = lab.get("cfg") or ""
    return [per_cfg[cfg]] if cfg in per_cfg else list(per_cfg.values()) if not cfg else []


def _config_value(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def is_model(lab: dict[str, Any], rec: dict[str, Any], model: official.Setting) -> bool:
    """Whether the training config behind a run has every value of ``model`` (λ1, λ2, ρ, ρ_t, gen_step, WCCF)."""
    cfg = training_record(lab, rec).get("config", {})
    pairs = model.opts()
    for key, want in zip(pairs[::2], pairs[1::2]):
        got = _config_value(cfg, key)
        if got is None or (str(got) != want if isinstance(got, (bool, str)) else float(got) != float(want)):
            return False
    return True


def _choose(unit_runs: dict[str, list[Run]], rule: str, oracle: Callable[[list[Run]], Optional[float]],
            fallback: list[str], name: str) -> Optional[list[str]]:
    """The settings kept for one unit (None: nothing to select on)."""
    if rule == "official":
        models = official_models(next(iter(unit_runs.values()))[0][0])
        if not models:
            return list(unit_runs)  # no official model: every setting stays a row
        hits = [s for s, rs in unit_runs.items() if any(is_model(*rs[0], m) for m in models)]
        if hits:
            return hits[:1]
        fallback.append(name)
        rule = "val"
    if len(unit_runs) == 1:
        return list(unit_runs)
    if rule == "val":
        value = {s: val_accuracy(*rs[0]) for s, rs in unit_runs.items()}
    else:
        value = {s: oracle(rs) for s, rs in unit_runs.items()}
    known = {s: v for s, v in value.items() if v is not None}
    if not known:
        return None
    best = max(known.values())
    return [next(s for s in unit_runs if known.get(s) == best)]  # first planned on ties


def _unit_name(unit: tuple) -> str:
    return "/".join(str(u) for u in unit if u not in (None, ""))


def select_runs(runs: list[Run], rule: str, score: Optional[str] = None) -> tuple[list[Run], list[str]]:
    """Keep the runs of the selected setting per unit; relabel rows. Returns (runs, notes for the reader).

    Every kept run's labels get ``model`` (the setting it was trained with); ``rule`` ``auto`` is resolved with
    :func:`resolve_rule` first.
    """
    if rule not in RULES + (AUTO,):
        raise SystemExit(f"error: --select must be one of {RULES + (AUTO,)}, got {rule!r}")
    rule = resolve_rule(runs, rule)
    if rule == "none":
        return [(dict(lab, model=_setting(lab)), rec) for lab, rec in runs], []
    units: dict[tuple, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for lab, rec in runs:
        units[_unit(lab)][_setting(lab)].append((lab, rec))
    oracle = test_objective(score)
    chosen: dict[tuple, list[str]] = {}
    notes: list[str] = []
    fallback: list[str] = []
    for unit, by_setting in units.items():
        kept = _choose(by_setting, rule, oracle, fallback, _unit_name(unit))
        if kept is None:
            notes.append(f"no {'validation' if rule in ('val', 'official') else 'test'} result to select among "
                         f"{len(by_setting)} settings for {_unit_name(unit)}")
        else:
            chosen[unit] = kept
    if fallback:
        notes.append(f"official: no run of the official model for {len(fallback)} unit(s), val-selected instead: "
                     + ", ".join(fallback[:8]) + (" ..." if len(fallback) > 8 else ""))
    picks: dict[tuple, Counter] = defaultdict(Counter)
    for unit, kept in chosen.items():
        if len(kept) == 1:
            picks[unit[:4]][kept[0]] += 1
    out: list[Run] = []
    for lab, rec in runs:
        unit, setting = _unit(lab), _setting(lab)
        if setting not in chosen.get(unit, ()):
            continue
        if len(chosen[unit]) > 1:  # every setting kept (no official model): its own row
            out.append((dict(lab, model=setting), rec))
            continue
        row = picks[unit[:4]]
        label = next(iter(row)) if len(row) == 1 else f"{rule}-selected"
        out.append((dict(lab, setting=_with_shots(label, lab), model=setting), rec))
    for row, counts in picks.items():
        if len(counts) > 1:
            notes.append(f"{_unit_name(row).replace('/', ' ')}: {rule} picks "
                         + ", ".join(f"{s} ({n}x)" for s, n in counts.most_common()))
    return out, notes


def model_lines(runs: list[Run]) -> list[str]:
    """Which model each row is: the rows whose held-out domains / seeds come from different settings, or whose
    label is a rule (``val-selected``), are listed ``domain seed: setting``; one line covers the other rows."""
    rows: dict[tuple, dict[tuple, str]] = defaultdict(dict)
    for lab, _ in runs:
        row = (lab.get("method") or lab.get("trainer"), lab.get("cfg", ""), lab.get("setting", ""))
        rows[row][(str(lab.get("domain")), str(lab.get("seed")))] = lab.get("model", _setting(lab))
    listed = {row: per for row, per in rows.items() if set(per.values()) != {_strip_shots(row[2])}}
    lines = []
    if len(listed) < len(rows):
        lines.append("> models: " + ("other rows: " if listed else "")
                     + "the setting column names the row's model (every held-out domain and seed)")
    for (method, cfg, setting), per in listed.items():
        cells = "; ".join(f"{d} seed{s}: {m or '-'}" for (d, s), m in sorted(per.items()))
        lines.append(f"> models of {' '.join(x for x in (method, cfg, setting) if x)}: {cells}")
    return lines


def _strip_shots(setting: str) -> str:
    """A row's setting label without the ``_shots<K>`` suffix Setup-I labels carry."""
    head, sep, tail = setting.rpartition("shots")
    if sep and tail.isdigit() and (head == "" or head.endswith("_")):
        return head[:-1] if head else ""
    return setting


def run_preset(lab: dict[str, Any], rec: dict[str, Any]) -> str:
    """The plan a run belongs to: the collector's ``plan`` label (the manifest's check of the run's fingerprint
    against the preset's run: ``official``, ``not official``, ``manual``), else the record's ``protocol.preset``."""
    return lab.get("plan") or (rec.get("protocol") or {}).get("preset", "unrecorded")


def protocol_lines(runs: list[Run], rule: str, fpr: Optional[str] = None, auto: bool = False) -> list[str]:
    """What made a table: selection rule (``auto``: it was chosen by :func:`resolve_rule`), preset(s), named
    switches off their official value, FPR95 convention, and which model each row is (:func:`model_lines`;
    ``runs`` are the selected runs)."""
    presets: Counter = Counter()
    fixed: Counter = Counter()
    for lab, rec in runs:
        prot = rec.get("protocol") or {}
        presets[run_preset(lab, rec)] += 1
        fixed.update(prot.get("fixed", []))
    why = ("" if not auto else " [default: every run is of the official preset]" if rule == "official"
           else " [default: not every run is of the official preset; --select official for the official models]")
    lines = [f"> selection: {RULE_TEXT[rule].format(models=official_text())}{why}",
             "> preset: " + ", ".join(f"{p} ({n} runs)" for p, n in presets.most_common()),
             "> switches: " + ("all official" if not fixed else
                               "FIXED " + ", ".join(f"{k} ({n} runs)" for k, n in fixed.most_common()))]
    if fpr:
        lines.append(f"> FPR95: {fpr}")
    notes = dict(lab["plan_note"] for lab, _ in runs if lab.get("plan_note"))  # rows not of the preset's plan
    lines += [f"> {name}: {why}" for name, why in sorted(notes.items())]
    return lines + model_lines(runs)


def oracle_model_gaps(runs: list[Run], score: Optional[str]) -> list[str]:
    """Header lines for an ORACLE detection table: the units where the detection pick (mean AUROC of ``score``)
    is another setting than the accuracy pick (the training run's held-out test accuracy, what the accuracy
    table's ORACLE maximises), i.e. where a method's accuracy and detection rows come from different models."""
    units: dict[tuple, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for lab, rec in runs:
        units[_unit(lab)][_setting(lab)].append((lab, rec))
    detect = test_objective(score)
    gaps = []
    for unit, by_setting in units.items():
        det = {s: detect(rs) for s, rs in by_setting.items()}
        acc = {s: training_record(*rs[0]).get("metrics", {}).get("test", {}).get("accuracy")
               for s, rs in by_setting.items()}
        picks = []
        for value in (acc, det):
            known = {s: v for s, v in value.items() if v is not None}
            picks.append(next((s for s in by_setting if known and known.get(s) == max(known.values())), None))
        if None not in picks and picks[0] != picks[1]:
            gaps.append(f"{_unit_name(unit)} (accuracy: {picks[0] or '-'}, detection: {picks[1] or '-'})")
    if not gaps:
        return ["> ORACLE: accuracy (training run's held-out accuracy) and detection (AUROC) pick the same model "
                "in every unit"]
    return [f"> ORACLE: the accuracy table's rows come from OTHER models than these detection rows in {len(gaps)} "
            f"unit(s): " + "; ".join(gaps)]
