"""launch.selection: validation-based model selection per (method, dataset, held-out domain, seed)."""
from __future__ import annotations

import pytest

from launch.selection import protocol_lines, select_runs


def _run(setting, domain, seed, val, test, shots=None, fixed=()):
    lab = {"method": "CRoFT", "cfg": "ViT_ep30", "dataset": "PACS", "domain": domain, "seed": seed,
           "setting": setting + (f"_shots{shots}" if shots else ""), "shots": shots}
    rec = {"mode": "train", "metrics": {"val": {"best_accuracy": val}, "test": {"accuracy": test}},
           "protocol": {"preset": "official", "fixed": list(fixed)}}
    return lab, rec


def test_val_picks_best_validation_not_best_test():
    runs = [_run("a", "sketch", 1, 50.0, 90.0), _run("b", "sketch", 1, 60.0, 10.0),
            _run("a", "sketch", 2, 70.0, 80.0), _run("b", "sketch", 2, 70.0, 20.0),  # tie -> first planned (a)
            _run("a", "photo", 1, 10.0, 99.0), _run("b", "photo", 1, 20.0, 1.0)]
    out, notes = select_runs(runs, "val")
    got = {(lab["domain"], lab["seed"]): rec["metrics"]["test"]["accuracy"] for lab, rec in out}
    assert got == {("sketch", 1): 10.0, ("sketch", 2): 80.0, ("photo", 1): 1.0}
    assert {lab["setting"] for lab, _ in out} == {"val-selected"}  # the picks differ between units
    assert any("b (2x)" in n and "a (1x)" in n for n in notes)
    oracle, _ = select_runs(runs, "oracle")
    assert {(lab["domain"], lab["seed"]): rec["metrics"]["test"]["accuracy"] for lab, rec in oracle} == \
        {("sketch", 1): 90.0, ("sketch", 2): 80.0, ("photo", 1): 99.0}
    assert select_runs(runs, "none")[0] == runs


def test_one_setting_keeps_its_label_and_shots_stay_apart():
    runs = [_run("a", "test_id", 1, 5.0, 5.0, shots=1), _run("a", "test_id", 1, 9.0, 9.0, shots=16)]
    out, notes = select_runs(runs, "val")
    assert sorted(lab["setting"] for lab, _ in out) == ["a_shots1", "a_shots16"] and not notes


def test_protocol_lines_and_bad_rule():
    runs = [_run("a", "sketch", 1, 1.0, 1.0, fixed=("OPTIM.WEIGHT_DECAY",)), _run("a", "photo", 1, 1.0, 1.0)]
    lines = protocol_lines(runs, "val", "energy → fpr95_val_threshold")
    assert lines[1] == "> preset: official (2 runs)" and lines[2] == "> switches: FIXED OPTIM.WEIGHT_DECAY (1 runs)"
    assert lines[3] == "> FPR95: energy → fpr95_val_threshold"
    with pytest.raises(SystemExit, match="--select"):
        select_runs(runs, "best")
