"""Model selection for the collected tables and the protocol lines printed above each table.

Rules (``--select``):

* ``val`` (default): per (method, config, shots, dataset, held-out domain, seed) the setting whose training run
  has the best source-domain validation accuracy (DomainBed's training-domain validation; the accuracy the
  trainer used to pick its best epoch); ties go to the first planned setting. Tables then average the chosen
  runs over seeds. No test data is looked at.
* ``oracle``: the same units, the setting with the best test result (held-out accuracy; mean AUROC of the first
  score for detection tables). Optimistic, labelled as such.
* ``none``: every setting is its own row (what a sweep trained, no selection).
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Any, Callable, Optional

from dassl.engine.records import is_done, load_record
from launch.sweep import COOP_DIR

RULES = ("val", "oracle", "none")
RULE_TEXT = {
    "val": "val (per method, dataset, held-out domain and seed: the setting with the best source-domain validation "
           "accuracy; then mean ± std over seeds)",
    "oracle": "ORACLE (per method, dataset, held-out domain and seed: the setting with the best TEST result; "
              "optimistic, not a valid model selection)",
    "none": "none (every trained setting is a row)",
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


def select_runs(runs: list[Run], rule: str, score: Optional[str] = None) -> tuple[list[Run], list[str]]:
    """Keep the runs of the selected setting per unit; relabel rows. Returns (runs, notes for the reader)."""
    if rule not in RULES:
        raise SystemExit(f"error: --select must be one of {RULES}, got {rule!r}")
    if rule == "none":
        return runs, []
    units: dict[tuple, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for lab, rec in runs:
        units[_unit(lab)][_setting(lab)].append((lab, rec))
    oracle = test_objective(score)
    chosen: dict[tuple, str] = {}
    notes: list[str] = []
    for unit, by_setting in units.items():
        if len(by_setting) == 1:
            chosen[unit] = next(iter(by_setting))
            continue
        if rule == "val":
            value = {s: val_accuracy(*rs[0]) for s, rs in by_setting.items()}
        else:
            value = {s: oracle(rs) for s, rs in by_setting.items()}
        known = {s: v for s, v in value.items() if v is not None}
        if not known:
            notes.append(f"no {'validation' if rule == 'val' else 'test'} result to select among "
                         f"{len(by_setting)} settings for {'/'.join(str(u) for u in unit if u not in (None, ''))}")
            continue
        best = max(known.values())
        chosen[unit] = next(s for s in by_setting if known.get(s) == best)  # first planned on ties
    picks: dict[tuple, Counter] = defaultdict(Counter)
    for unit, s in chosen.items():
        picks[unit[:4]][s] += 1
    out: list[Run] = []
    for lab, rec in runs:
        unit = _unit(lab)
        if chosen.get(unit) != _setting(lab):
            continue
        row = picks[unit[:4]]
        label = next(iter(row)) if len(row) == 1 else f"{rule}-selected"
        out.append((dict(lab, setting=_with_shots(label, lab)), rec))
    for row, counts in picks.items():
        if len(counts) > 1:
            name = " ".join(str(x) for x in row if x not in (None, ""))
            notes.append(f"{name}: {rule} picks " + ", ".join(f"{s} ({n}x)" for s, n in counts.most_common()))
    return out, notes


def protocol_lines(runs: list[Run], rule: str, fpr: Optional[str] = None) -> list[str]:
    """What made a table: selection rule, preset(s), named switches off their official value, FPR95 convention."""
    presets: Counter = Counter()
    fixed: Counter = Counter()
    for _, rec in runs:
        prot = rec.get("protocol") or {}
        presets[prot.get("preset", "unrecorded")] += 1
        fixed.update(prot.get("fixed", []))
    lines = [f"> selection: {RULE_TEXT[rule]}",
             "> preset: " + ", ".join(f"{p} ({n} runs)" for p, n in presets.most_common()),
             "> switches: " + ("all official" if not fixed else
                               "FIXED " + ", ".join(f"{k} ({n} runs)" for k, n in fixed.most_common()))]
    if fpr:
        lines.append(f"> FPR95: {fpr}")
    return lines
