"""The demo's report pieces on hand-made inputs: grid selection, tables, paired differences with intervals, the
summary, the energy decomposition, figures, the marker rewrites and the stage timings (fast; the whole pipeline
runs in test_demo.py; the verdict rule in test_demo_verdict.py)."""
from __future__ import annotations

import numpy as np
import pytest

from demo import compare, investigate, report, selection, tables
from launch import figures


def _rows():
    rows = []
    for seed in (1, 2):
        for l2, val, acc in (("1", 80.0, 60.0), ("10", 90.0 - seed, 50.0), ("100", 85.0, 70.0)):
            rows.append({"method": "CRoFT", "setting": f"demo_digits_l1-15_l2-{l2}_r0.2", "domain": "mnist",
                         "seed": seed, "ood": "F", "acc": acc, "val_acc": val, "mcm_fpr95": 10.0 * seed,
                         "mcm_auroc": 90.0})
        rows.append({"method": "CoOp", "setting": "demo_digits", "domain": "mnist", "seed": seed, "ood": "F",
                     "acc": 40.0 + seed, "val_acc": 70.0, "mcm_fpr95": 30.0, "mcm_auroc": 80.0})
    return rows


def test_selection_by_val_oracle_none():
    rows = _rows()
    val = selection.select(rows, "val")
    ten = "demo_digits_l1-15_l2-10_r0.2"
    assert [(r["method"], r["seed"], r["setting"]) for r in val] == [
        ("CRoFT", 1, ten), ("CoOp", 1, "demo_digits"), ("CRoFT", 2, ten), ("CoOp", 2, "demo_digits")]
    assert {r["selected_by"] for r in val if r["method"] == "CRoFT"} == {"val"}
    assert {r["selected_by"] for r in val if r["method"] == "CoOp"} == {""}
    oracle = selection.select(rows, "oracle")
    assert {r["setting"] for r in oracle if r["method"] == "CRoFT"} == {"demo_digits_l1-15_l2-100_r0.2"}
    assert selection.select(rows, "none") == rows
    with pytest.raises(ValueError, match="selection mode"):
        selection.select(rows, "best")


def test_tables_cells_are_mean_and_sample_std():
    assert tables.cell([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert tables.cell([5.0]) == "5.00 ± 0.00" and tables.cell([]) == "-"
    t = tables.by_domain_table(selection.select(_rows(), "val"), ["acc"], ["mnist"])
    assert "| CRoFT | 50.00 ± 0.00 | 50.00 ± 0.00 | 2 |" in t
    assert "| CoOp | 41.50 ± 0.71 | 41.50 ± 0.71 | 2 |" in t


def test_average_table_is_the_avg_column():
    chosen = selection.select(_rows(), "val")
    t = tables.average_table(chosen, [("acc", "accuracy"), ("mcm_fpr95", "MCM FPR95")], ["mnist"])
    assert "| method | accuracy | MCM FPR95 |" in t
    assert "| CoOp | 41.50 ± 0.71 | 30.00 ± 0.00 |" in t and "| CRoFT | 50.00 ± 0.00 | 15.00 ± 7.07 |" in t


def test_paired_table_reports_difference_and_interval():
    t = tables.paired_table(selection.select(_rows(), "val"), "CRoFT", [("acc", "accuracy")])
    # differences 9 and 8: mean 8.5, sd 0.7071, t(0.975, 1) = 12.7062 -> 8.5 -/+ 6.3531
    assert "| CoOp | +8.50 [+2.15, +14.85] | 2 |" in t


def test_energy_splits_into_class_agnostic_and_discriminative_parts():
    from scipy.special import logsumexp

    logits = np.random.default_rng(0).normal(size=(7, 10)) * 5
    mean, centred = investigate.parts(logits)
    np.testing.assert_allclose(mean + centred, logsumexp(logits, axis=1), rtol=1e-12)
    np.testing.assert_allclose(mean, logits.mean(1))
    assert investigate.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 100.0


def test_figures_write_pngs(tmp_path):
    rows = _rows()
    assert figures.param_value("demo_digits_l1-15_l2-100_r0.2_rt0.5_g1", "lambda2") == 100.0
    assert figures.param_value("demo_digits_l1-15_l2-100_r0.2_rt0.5_g1", "lambda1") == 15.0
    with pytest.raises(ValueError, match="encodes no lambda2"):
        figures.param_value("demo_digits", "lambda2")
    rng = np.random.default_rng(0)
    paths = [figures.sensitivity([r for r in rows if r["method"] == "CRoFT"], str(tmp_path / "s.png")),
             figures.score_histograms({"A": {"ID": rng.normal(size=50), "OOD": rng.normal(1, 1, 40)}},
                                      str(tmp_path / "h.png")),
             figures.roc_curves({"A": (rng.normal(1, 1, 50), rng.normal(size=40))}, str(tmp_path / "r.png"))]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_readme_markers_rewrite(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{report.BEGIN}\nold\n{report.END}\nb\n{report.HEADLINE[0]}\nh\n{report.HEADLINE[1]}\n",
                      encoding="utf-8")
    report.write_between_markers(str(readme), "new table\n")
    report.write_between_markers(str(readme), "headline", report.HEADLINE)
    assert readme.read_text(encoding="utf-8") == (f"a\n{report.BEGIN}\nnew table\n{report.END}\nb\n"
                                                  f"{report.HEADLINE[0]}\nheadline\n{report.HEADLINE[1]}\n")
    bad = tmp_path / "R2.md"
    bad.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="lacks the markers"):
        report.write_between_markers(str(bad), "x")
    assert bad.read_text(encoding="utf-8") == "no markers\n"
    with pytest.raises(SystemExit, match="--headline .*R2.md lacks the markers <!-- headline:start -->"):
        report.check_markers(str(bad), report.HEADLINE, "--headline")
    with pytest.raises(SystemExit, match="--readme .*none.md: no such file"):
        report.check_markers(str(tmp_path / "none.md"), report.SECTION, "--readme")


def test_summary_states_the_verdict_with_effect_sizes():
    text = report.summary(selection.select(_rows(), "val"))
    assert "_No verdict" in text  # no energy FPR95 in these rows
    rows = [dict(r, energy_fpr95=r["mcm_fpr95"]) for r in selection.select(_rows(), "val")]
    text = report.summary(rows)
    # two pairs: accuracy +8.50 [+2.15, +14.85] is beyond the 1-point margin, FPR95 (10 and 20 vs 30) gives
    # -15 +- 12.7062 * 7.0711 / sqrt(2) = [-78.53, +48.53]: inconclusive
    assert text.startswith("**Verdict: inconclusive.**")
    assert "held-out accuracy: better; energy FPR95: no clear difference" in text
    assert "CRoFT 50.00 % vs 41.50 % for CoOp" in text and "+8.50 points [95 % CI +2.15, +14.85]" in text
    assert "-15.00 points [95 % CI -78.53, +48.53]" in text


def test_coop_finding_names_the_class_agnostic_part(tmp_path):
    """Open-set logits with a larger common offset but flat classes: energy and the mean logit rank them as ID,
    the centred logsumexp does not; the generated finding says so and draws the figure."""
    rng = np.random.default_rng(0)
    rows = []
    for method, offset in (("CoOp", 8.0), ("ZS-CLIP", 1.0)):
        for dom, shift in (("mnist", offset), ("inkpaper", -offset)):
            d = tmp_path / method / dom
            d.mkdir(parents=True)
            idl = rng.normal(size=(60, 10)) + 6.0 * np.eye(10)[rng.integers(0, 10, 60)]
            ood = rng.normal(size=(50, 10)) * 0.3 + shift
            np.savez(d / "scores.npz", test__logits=idl, ood_test__logits=ood)
            rows.append({"method": method, "setting": "", "domain": dom, "seed": 1, "ood": "F", "dir": str(d)})
    dec = investigate.decompose(rows)
    coop_mnist = next(x for x in dec if x["method"] == "CoOp" and x["domain"] == "mnist")
    assert coop_mnist["energy"] < 50 and coop_mnist["agnostic"] < 50 <= coop_mnist["discriminative"]
    text = "\n".join(report.coop_finding(rows, str(tmp_path / "fig"), "fig"))
    assert "with mnist held out" in text and "CoOp's energy follows the class-agnostic part" in text
    assert (tmp_path / "fig" / "coop_energy_parts.png").is_file()


def test_effects_figure_and_stage_timings(tmp_path):
    import time

    from demo.timing import Stages

    rows = [dict(r, energy_fpr95=r["mcm_fpr95"]) for r in selection.select(_rows(), "val")]
    png = report.effects_figure(rows, str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    stages = Stages()
    with stages.stage("data"):
        time.sleep(0.05)
    with stages.stage("report"):
        pass
    stages.note("data", "3 files")
    line = stages.line()
    assert line.startswith("stage timings (wall s): data ") and "(3 files), report 0.0; total " in line
    assert float(line.split("data ")[1].split(" ")[0]) >= 0.05
    assert " s CPU (this process and its exited workers), load average " in line


def test_compare_reports_how_far_runs_and_cells_moved():
    """Another CPU's rows: one CoOp run moves by 0.3 and one CRoFT setting by 2.0 (the selected one, λ2=10):
    runs move by at most 2.0, cells (mean over the 2 seeds) by at most 1.0; tables without values are left out."""
    a = _rows()
    b = [dict(r) for r in a]
    b[3]["acc"] += 0.3  # CoOp, seed 1
    b[1]["acc"] += 2.0  # CRoFT λ2=10, seed 1: selected by val in both
    moved = {m["table"]: m for m in compare.moved(a, b)}
    assert moved["held-out accuracy"]["runs"] == 8
    assert moved["held-out accuracy"]["max_run"] == pytest.approx(2.0)
    assert moved["held-out accuracy"]["max_cell"] == pytest.approx(1.0)
    assert moved["MCM FPR95"]["max_run"] == 0 and "energy FPR95" not in moved


def test_a_cache_folder_holds_runs_of_one_tiny_clip(tmp_path):
    """Weights are not fingerprinted: the demo refuses to mix runs of two tiny CLIPs in one cache folder."""
    from demo.run import check_weights

    check_weights(str(tmp_path / "demo"), "a" * 64)
    check_weights(str(tmp_path / "demo"), "a" * 64)  # the same weights: fine
    with pytest.raises(SystemExit, match=f"holds runs of the tiny CLIP sha256 {'a' * 64}, this run uses {'b' * 64}"):
        check_weights(str(tmp_path / "demo"), "b" * 64)


def test_bitwise_compare_cuts_each_cache_folder_off_image_paths():
    """``python -m demo.compare --bitwise``: two cache folders hold the same data tree at two places, so image paths
    are compared below each folder; numbers by dtype and bits."""
    import numpy as np

    from demo.compare import _equal

    a, b = np.array(["/x/a/data/d/1.png", "/x/a/data/d/2.png"]), np.array(["/y/bb/data/d/1.png", "/y/bb/data/d/2.png"])
    assert _equal(a, b, ("/x/a", "/y/bb")) and not _equal(a, b, ("", ""))
    assert not _equal(a, b[::-1], ("/x/a", "/y/bb"))
    assert _equal(np.float32([1.0, 2.0]), np.float32([1.0, 2.0]), ("", ""))
    assert not _equal(np.float32([1.0]), np.float64([1.0]), ("", ""))
    assert not _equal(np.float32([1.0]), np.float32([np.nextafter(np.float32(1.0), np.float32(2.0))]), ("", ""))
