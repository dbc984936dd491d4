"""Drivers refuse bad names before planning (one line: the value, the choices, the near miss), and
``tools/manifest.py`` lists and drops planned runs (a misspelt domain planned before names were checked)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import COOP, TINY
from synthetic import write_lodo_tree

PACS = "(choose from sketch, photo, cartoon, art_painting)"  # the official held-out domains (spec 2.1)
TRAINERS = ", ".join(sorted(os.listdir(os.path.join(COOP, "configs", "trainers"))))  # each has its config folder


def _main(setup: int, argv: list[str], evaluate: bool = False, trainer: str = "CRoFT") -> int:
    from launch import setup1, setup2

    return (setup1 if setup == 1 else setup2).main(["--root", "/nonexistent", "--dry-run", *argv],
                                                   trainer=trainer, evaluate=evaluate)


@pytest.mark.parametrize("setup, argv, evaluate, line", [
    (2, ["--domains", "sketch", "skech"], False,
     f"error: --domains 'skech' is not a PACS domain {PACS}; did you mean 'sketch'?"),
    (2, ["--datasets", "VLCS", "--domains", "LabelMe"], True,
     "error: --domains 'LabelMe' is not a VLCS domain (choose from labelme, sun, pascal, caltech); "
     "did you mean 'labelme'?"),
    (2, ["--datasets", "PACS", "VLCS", "--domains", "sketch"], False,
     "error: --domains 'sketch' is not a VLCS domain (choose from labelme, sun, pascal, caltech)"),
    (2, ["--datasets", "PCAS"], False,
     "error: --datasets 'PCAS' is not a Setup-II dataset (choose from DigitsDG, PACS, VLCS); did you mean 'PACS'?"),
    (2, ["--ood", "DTD", "food101"], True,
     "error: --ood 'food101' is not an open-set dataset of PACS (choose from Caltech101, DTD, Food101); "
     "did you mean 'Food101'?"),
    (2, ["--trainer", "CRoft"], False,
     f"error: --trainer 'CRoft' is not a trainer (choose from {TRAINERS}); did you mean 'CRoFT'?"),
    (1, ["--trainer", "CoOP"], True,
     f"error: --trainer 'CoOP' is not a trainer (choose from {TRAINERS}); did you mean 'CoOp'?"),
])
def test_bad_names_are_one_line_before_planning(setup, argv, evaluate, line, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert _main(setup, [*argv, "--output-root", out, "--eval-root", out], evaluate) == 2
    cap = capsys.readouterr()
    assert cap.err.strip() == line and cap.out == ""  # nothing planned or listed
    assert not os.path.exists(out)


@pytest.mark.parametrize("setup", [1, 2])
def test_bad_config_name_lists_the_trainers_configs(setup, capsys):
    assert _main(setup, ["--cfgs", "vit_ep30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --cfgs 'vit_ep30' is not a CRoFT config (choose from ")
    assert err.endswith("; did you mean 'ViT_ep30'?") and "rn50_ep30, " in err and "\n" not in err


def test_valid_names_plan(capsys):
    assert _main(2, ["--datasets", "VLCS", "--domains", "labelme", "--seeds", "1", "--cfgs", "rn50_ep30",
                     "--ood", "DTD"], evaluate=True) == 0
    assert "test_on_labelme.json" in capsys.readouterr().out


def test_script_refuses_with_exit_code_2():
    """The user's entry point (scripts/<trainer>/...): one stderr line, exit code 2, no traceback."""
    res = subprocess.run([sys.executable, "scripts/CoOp/test_setup2.py", "--root", "/nonexistent", "--dry-run",
                          "--domains", "cartoon", "art_paintng"], cwd=COOP, capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: --domains 'art_paintng' is not a PACS domain {PACS}; " \
                                 "did you mean 'art_painting'?"


# ------------------------------------------------------------------ tools/manifest.py
def _old_manifest(monkeypatch, tmp_path) -> tuple[str, str]:
    """A manifest written before names were checked: its runs include a misspelt domain; PACS sketch is done."""
    from launch import setup2
    from launch.sweep import run_jobs, write_manifest

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    write_lodo_tree(data, per_class=3)
    monkeypatch.delattr(setup2, "check_args")
    args, jobs = setup2.plan(["--root", data, "--output-root", out, "--cfgs", "rn50_ep30", "--seeds", "1",
                              "--domains", "sketch", "skech", "--shots", "1", "--epochs", "1", "--lambda2", "1",
                              "--lambda1", "15", "--ratios", "0.2,0.5", "--gen-step", "0", "--", *TINY],
                             trainer="CRoFT")
    monkeypatch.undo()
    assert len(jobs) == 4  # PACS and VLCS x 2 domains (before names were checked, VLCS got sketch/skech runs too)
    path = write_manifest(out, "setup2_train", jobs)
    assert run_jobs(jobs[:1], launcher="inprocess") == 0
    os.makedirs(jobs[1].output_dir)  # PACS skech: a directory the failed run left
    open(os.path.join(jobs[1].output_dir, "log.txt"), "w").close()
    return out, path


def jobs_dir(manifest_text: str, dataset: str, domain: str) -> str:
    (d,) = [j["output_dir"] for j in json.loads(manifest_text)["jobs"]
            if j["labels"]["dataset"] == dataset and j["labels"]["domain"] == domain]
    return d


def _tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/manifest.py", *argv], cwd=COOP, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)


def test_manifest_drop_forgets_planned_runs(monkeypatch, tmp_path):
    from launch.collect import gather

    out, path = _old_manifest(monkeypatch, tmp_path)
    before = open(path).read()
    assert sum("skech" in m for m in gather(out, "train")[1]) == 2  # missing runs, forever

    listed = _tool("list", "--root", out)
    assert listed.returncode == 0 and listed.stdout.count("[todo]") == 3 and listed.stdout.count("[done]") == 1
    assert "[done] CRoFT/PACS_rn50_ep30_l1-15_l2-1_r0.2_rt0.5_g0/test_on_sketch.json/seed1" in listed.stdout
    assert _tool("list", "--missing", "--root", out).stdout.count("[done]") == 0

    dry = _tool("drop", "--root", out, "--dry-run", "*/test_on_skech.json/*")
    assert dry.returncode == 0 and "would drop 2 planned runs" in dry.stdout and open(path).read() == before

    res = _tool("drop", "--root", out, "*/test_on_skech.json/*")
    assert res.returncode == 0 and "dropped 2 planned runs" in res.stdout
    missing = gather(out, "train")[1]
    assert len(missing) == 1 and "test_on_sketch.json" in missing[0] and "VLCS" in missing[0]
    assert os.path.isfile(os.path.join(jobs_dir(before, "PACS", "skech"), "log.txt"))  # directories left alone
    kept = json.loads(open(path).read())["jobs"]
    old = {j["output_dir"]: j for j in json.loads(before)["jobs"]}
    assert [old[j["output_dir"]] for j in kept] == kept and len(kept) == 2  # entries kept as they were

    # a pattern that matches nothing (here: next to one that matches) is one line, exit 2, nothing written
    after = open(path).read()
    again = _tool("drop", "--root", out, "CRoFT/PACS_*", "*/test_on_skech.json/*")
    assert again.returncode == 2 and open(path).read() == after
    assert again.stderr.strip().startswith("error: no planned run matches '*/test_on_skech.json/*' in the "
                                           "manifests under ")
    assert again.stderr.count("\n") == 1
