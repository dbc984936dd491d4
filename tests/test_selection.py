"""launch.selection: model selection per (method, dataset, held-out domain, seed) and the table headers.

The official models are written here from the official open-set scripts (CRoFT/test_openood_setup2_pacs.sh:21-23
loads PACS_<CFG>_5_1000, trained by croft_pacs.sh with ratio 0.2 / ratio_text 0.5, gen_step 0 for rn50_ep30;
test_openood_setup2_vlcs.sh:20-22 loads VLCS_<CFG>_15_1000, gen_step 5), not read from launch/official.py.
"""
from __future__ import annotations

import pytest

from launch.selection import model_lines, oracle_model_gaps, protocol_lines, resolve_rule, select_runs

PACS_RN50_OFFICIAL = {"lambda1": 5.0, "lambda2": 1000.0, "ratio": 0.2, "ratio_text": 0.5, "gen_step": 0, "WCCF": True}


def _run(setting, domain, seed, val, test, shots=None, fixed=(), croft=None, preset="official", dataset="PACS",
         auroc=None):
    lab = {"method": "CRoFT", "trainer": "CRoFT", "cfg": "rn50_ep30", "dataset": dataset, "domain": domain,
           "seed": seed, "setting": setting + (f"_shots{shots}" if shots else ""), "shots": shots}
    rec = {"mode": "train", "metrics": {"val": {"best_accuracy": val}, "test": {"accuracy": test}},
           "protocol": {"preset": preset, "fixed": list(fixed)},
           "config": {"TRAINER": {"CRoFT": dict(croft or {"lambda1": 15.0, "lambda2": 10.0, "ratio": 0.2,
                                                          "ratio_text": 0.5, "gen_step": 0, "WCCF": True})}}}
    if auroc is not None:
        rec["metrics"]["ood"] = {"energy": {"auroc": auroc}}
    return lab, rec


def _strip(runs):
    return [({k: v for k, v in lab.items() if k != "model"}, rec) for lab, rec in runs]


def test_val_picks_best_validation_not_best_test():
    runs = [_run("a", "sketch", 1, 50.0, 90.0), _run("b", "sketch", 1, 60.0, 10.0),
            _run("a", "sketch", 2, 70.0, 80.0), _run("b", "sketch", 2, 70.0, 20.0),  # tie -> first planned (a)
            _run("a", "photo", 1, 10.0, 99.0), _run("b", "photo", 1, 20.0, 1.0)]
    out, notes = select_runs(runs, "val")
    got = {(lab["domain"], lab["seed"]): rec["metrics"]["test"]["accuracy"] for lab, rec in out}
    assert got == {("sketch", 1): 10.0, ("sketch", 2): 80.0, ("photo", 1): 1.0}
    assert {lab["setting"] for lab, _ in out} == {"val-selected"}  # the picks differ between units
    assert {(lab["domain"], lab["seed"]): lab["model"] for lab, _ in out} == {("sketch", 1): "b", ("sketch", 2): "a",
                                                                              ("photo", 1): "b"}
    assert any("b (2x)" in n and "a (1x)" in n for n in notes)
    oracle, _ = select_runs(runs, "oracle")
    assert {(lab["domain"], lab["seed"]): rec["metrics"]["test"]["accuracy"] for lab, rec in oracle} == \
        {("sketch", 1): 90.0, ("sketch", 2): 80.0, ("photo", 1): 99.0}
    assert _strip(select_runs(runs, "none")[0]) == runs


def test_one_setting_keeps_its_label_and_shots_stay_apart():
    runs = [_run("a", "test_id", 1, 5.0, 5.0, shots=1), _run("a", "test_id", 1, 9.0, 9.0, shots=16)]
    out, notes = select_runs(runs, "val")
    assert sorted(lab["setting"] for lab, _ in out) == ["a_shots1", "a_shots16"] and not notes


def test_official_picks_the_official_model_and_falls_back_to_val():
    official = "l1-5_l2-1000_r0.2_rt0.5_g0"
    runs = [_run("l1-15_l2-10", "sketch", 1, 90.0, 90.0), _run(official, "sketch", 1, 10.0, 10.0,
                                                                croft=PACS_RN50_OFFICIAL),
            _run("l1-15_l2-10", "photo", 1, 90.0, 70.0), _run(official, "photo", 1, 10.0, 20.0,
                                                               croft=PACS_RN50_OFFICIAL),
            # no run of the official model for (cartoon, seed 1): val decides there
            _run("l1-15_l2-10", "cartoon", 1, 10.0, 30.0), _run("l1-15_l2-1", "cartoon", 1, 20.0, 40.0,
                                                                croft={**PACS_RN50_OFFICIAL, "lambda1": 15.0})]
    out, notes = select_runs(runs, "official")
    got = {lab["domain"]: (lab["model"], rec["metrics"]["test"]["accuracy"]) for lab, rec in out}
    assert got == {"sketch": (official, 10.0), "photo": (official, 20.0), "cartoon": ("l1-15_l2-1", 40.0)}
    assert any("official model" in n and "cartoon" in n for n in notes)
    lines = model_lines(out)  # the row mixes two settings: the header lists them per held-out domain and seed
    assert lines == [f"> models of CRoFT rn50_ep30 official-selected: cartoon seed1: l1-15_l2-1; photo seed1: "
                     f"{official}; sketch seed1: {official}"]
    # a gen_step that differs from the official model's is another model
    other = [_run(official, "sketch", 1, 10.0, 10.0, croft={**PACS_RN50_OFFICIAL, "gen_step": 1}),
             _run("l1-15_l2-10", "sketch", 1, 90.0, 90.0)]
    assert [lab["model"] for lab, _ in select_runs(other, "official")[0]] == ["l1-15_l2-10"]


def test_official_without_an_official_model_keeps_every_setting():
    # Setup-I (ImageNet46): the official test_setup1.py evaluates all 25 pairs, no model is fixed
    runs = [_run("l1-1_l2-1", "test_id", 1, 50.0, 50.0, shots=16, dataset="ImageNet46"),
            _run("l1-5_l2-5", "test_id", 1, 60.0, 40.0, shots=16, dataset="ImageNet46")]
    out, notes = select_runs(runs, "official")
    assert sorted(lab["setting"] for lab, _ in out) == ["l1-1_l2-1_shots16", "l1-5_l2-5_shots16"] and not notes
    assert model_lines(out) == ["> models: the setting column names the row's model (every held-out domain and seed)"]


def test_auto_is_official_only_for_official_preset_runs():
    official = [_run("a", "sketch", 1, 1.0, 1.0), _run("b", "sketch", 1, 2.0, 2.0)]
    mixed = official + [_run("c", "sketch", 1, 3.0, 3.0, preset="grid")]
    assert resolve_rule(official, "auto") == "official" and resolve_rule(mixed, "auto") == "val"
    assert resolve_rule(official, "oracle") == "oracle"
    out, _ = select_runs(mixed, "auto")  # val: the best validation accuracy (c)
    assert [lab["model"] for lab, _ in out] == ["c"]
    lines = protocol_lines(out, "val", auto=True)
    assert lines[0].startswith("> selection: val") and "not every run is of the official preset" in lines[0]
    lines = protocol_lines(official, "official", auto=True)
    assert "PACS l1-5_l2-1000_r0.2_rt0.5_g0 / l1-5_l2-1000_r0.2_rt0.5_g1" in lines[0]
    assert "VLCS l1-15_l2-1000_r0.2_rt0.5_g5" in lines[0] and "every run is of the official preset" in lines[0]


def test_oracle_names_units_whose_accuracy_and_detection_models_differ():
    runs = [_run("a", "sketch", 1, 1.0, 90.0, auroc=0.5), _run("b", "sketch", 1, 1.0, 10.0, auroc=0.9),
            _run("a", "photo", 1, 1.0, 90.0, auroc=0.9), _run("b", "photo", 1, 1.0, 10.0, auroc=0.5)]
    lines = oracle_model_gaps(runs, "energy")
    assert lines == ["> ORACLE: the accuracy table's rows come from OTHER models than these detection rows in 1 "
                     "unit(s): CRoFT/rn50_ep30/PACS/sketch/1 (accuracy: a, detection: b)"]
    assert "same model" in oracle_model_gaps(runs[2:], "energy")[0]


def test_protocol_lines_and_bad_rule():
    runs = [_run("a", "sketch", 1, 1.0, 1.0, fixed=("OPTIM.WEIGHT_DECAY",)), _run("a", "photo", 1, 1.0, 1.0)]
    lines = protocol_lines(runs, "val", "energy → fpr95_id_percentile")
    assert lines[1] == "> preset: official (2 runs)" and lines[2] == "> switches: FIXED OPTIM.WEIGHT_DECAY (1 runs)"
    assert lines[3] == "> FPR95: energy → fpr95_id_percentile"
    assert lines[4].startswith("> models: the setting column")
    with pytest.raises(SystemExit, match="--select"):
        select_runs(runs, "best")


@pytest.fixture(scope="module")
def by_hand(tmp_path_factory):
    """Two CRoFT PACS models trained and evaluated with train.py by hand (no manifest): the official one
    (lambda1 5 / lambda2 1000, ratio 0.2 / 0.5, gen_step 0 for rn50_ep30) and another setting."""
    from helpers import cli_args, run_cli
    from synthetic import write_lodo_tree
    from synthetic_openset import write_all_openset

    base = tmp_path_factory.mktemp("by_hand")
    data = str(base / "data")
    write_lodo_tree(data, per_class=4)
    write_all_openset(data)
    for l1, l2 in ((15, 10), (5, 1000)):
        tag = f"l1-{l1}_l2-{l2}_r0.2_rt0.5_g0"
        model = str(base / "output" / "CRoFT" / f"PACS_rn50_ep30_{tag}" / "test_on_sketch.json" / "seed1" / "shots2")
        croft = ["TRAINER.CRoFT.lambda1", str(l1), "TRAINER.CRoFT.lambda2", str(l2), "TRAINER.CRoFT.gen_step", "0",
                 "TRAINER.CRoFT.ratio", "0.2", "TRAINER.CRoFT.ratio_text", "0.5", "TRAINER.CRoFT.WCCF", "True"]
        run_cli(cli_args(data, model, "CRoFT", extra=["TEST_ENV", "test_on_sketch.json", "DATASET.NUM_SHOTS", "2",
                                                      "OPTIM.MAX_EPOCH", "1", *croft]))
        out = str(base / "eval" / "CRoFT" / f"PACS_DTD_rn50_ep30_{tag}" / "test_on_sketch.json" / "seed1")
        evaluation = ["TEST_ENV", "test_on_sketch.json", *croft, "TRAINER.CRoFT.ratio", "0.5",
                      "TRAINER.CRoFT.ratio_text", "0"]
        run_cli(cli_args(data, out, "CRoFT", dataset_cfg="configs/datasets/PACS_DTD.yaml",
                         flags=["--eval-only", "--model-dir", model], extra=evaluation))
    return base


def _record(path):
    import json

    with open(path / "record.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_collectors_select_official_reports_the_official_model(by_hand, capsys):
    from launch import collect

    official = "l1-5_l2-1000_r0.2_rt0.5_g0"
    model = by_hand / "output" / "CRoFT" / f"PACS_rn50_ep30_{official}" / "test_on_sketch.json" / "seed1" / "shots2"
    acc = _record(model)["metrics"]["test"]["accuracy"]
    assert collect.main("oodg", ["--root", str(by_hand / "output"), "--select", "official"]) == 0
    out = capsys.readouterr().out
    assert "> selection: official (the model the official scripts evaluate: " in out
    row = next(line for line in out.splitlines() if line.startswith("| CRoFT"))
    assert f"{official}_shots2 | {acc:.2f} | {acc:.2f} | 1 |" in row  # one row: the official model
    ev = _record(by_hand / "eval" / "CRoFT" / f"PACS_DTD_rn50_ep30_{official}" / "test_on_sketch.json" / "seed1")
    auroc = 100 * ev["metrics"]["ood"]["energy"]["auroc"]
    assert collect.main("oodd", ["--root", str(by_hand / "eval"), "--select", "official", "--scores", "energy"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| CRoFT")]
    assert len(rows) == 1 and f"{official}_shots2 | energy |" in rows[0] and f"| {auroc:.2f} |" in rows[0]
    assert "> models: the setting column names the row's model (every held-out domain and seed)" in out
    # ORACLE picks detection rows by AUROC and says whether the accuracy table's model is another one
    assert collect.main("oodd", ["--root", str(by_hand / "eval"), "--select", "oracle", "--scores", "energy"]) == 0
    assert "> ORACLE: " in capsys.readouterr().out
    # by hand (preset manual): the default is val, and the header says why
    assert collect.main("oodg", ["--root", str(by_hand / "output")]) == 0
    assert "> selection: val" in capsys.readouterr().out
