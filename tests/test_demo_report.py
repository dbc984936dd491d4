"""The demo's report pieces on hand-made inputs: grid selection, tables, paired tests, the energy decomposition,
figures and the README marker rewrite (fast; the whole pipeline runs in test_demo.py)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from demo import investigate, report, selection, tables
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


def test_paired_test_wilcoxon_and_sign_test(monkeypatch):
    a, b = [2.0, 4.0, 6.0, 8.0, 10.0, 12.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # all six differences positive: exact two-sided p = 2 / 2**6 for both tests
    assert tables.paired_test(a, b) == (pytest.approx(2 / 64), "wilcoxon")
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert tables.paired_test(a, b) == (pytest.approx(2 / 64), "sign test")
    assert tables.paired_test([1.0, 3.0], [2.0, 2.0])[0] == pytest.approx(1.0)


def test_paired_table_reports_difference_and_p():
    t = tables.paired_table(selection.select(_rows(), "val"), "CRoFT", [("acc", "accuracy")])
    assert "| CoOp | 8.50 ± 0.71 (p=0.5, n=2) |" in t


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
    readme.write_text(f"a\n{report.BEGIN}\nold\n{report.END}\nb\n", encoding="utf-8")
    report.write_between_markers(str(readme), "new table\n")
    assert readme.read_text(encoding="utf-8") == f"a\n{report.BEGIN}\nnew table\n{report.END}\nb\n"
    bad = tmp_path / "R2.md"
    bad.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="lacks the markers"):
        report.write_between_markers(str(bad), "x")
    assert bad.read_text(encoding="utf-8") == "no markers\n"


def test_summary_states_the_claim_with_numbers():
    text = report.summary(selection.select(_rows(), "val"))
    assert "_No summary" in text  # no energy FPR95 in these rows
    rows = [dict(r, energy_fpr95=r["mcm_fpr95"]) for r in selection.select(_rows(), "val")]
    text = report.summary(rows)
    assert "50.00 % held-out accuracy vs 41.50 % for CoOp" in text and "neither supported nor refuted" in text
    assert "with 2 pairs the smallest attainable two-sided p is 0.5" in text


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
