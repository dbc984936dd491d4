"""One evaluation pass over several open-set datasets (``train.py --eval-open-set``, the Setup-II default) gives
the records and arrays of one run per (model, open-set dataset) (``--eval-per-ood``), skips done directories and
reruns only the ones whose ``done`` is gone."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from helpers import COOP, assert_ood_matches_scores, run_cli
from synthetic import write_lodo_tree
from synthetic_openset import write_all_openset

TINY = ["MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "DEVICE", "cpu"]
OODS = ("DTD", "Caltech101")
SCORES = ("energy", "mcm", "msp", "knn")


def _record(d) -> dict:
    with open(os.path.join(d, "record.json")) as f:
        return json.load(f)


def _assert_close(a, b, path="metrics"):
    """Nested metric dicts equal: numbers to 1e-9, everything else exactly."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-9), path
    else:
        assert a == b, path


def _assert_same_run(sep_dir, one_dir):
    sep, one = _record(sep_dir), _record(one_dir)
    _assert_close(sep["metrics"], one["metrics"])
    assert sep["metrics"]["ood"].keys() == set(SCORES)
    with np.load(os.path.join(sep_dir, "scores.npz")) as a, np.load(os.path.join(one_dir, "scores.npz")) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            assert np.array_equal(a[k], b[k]), k
    for rec in (sep, one):  # what differs is where the run was written (and how it was run)
        rec["config"].pop("OUTPUT_DIR")
    assert sep["config"] == one["config"] and sep["protocol"] == one["protocol"]
    assert "shared_pass" not in sep and one["shared_pass"]["model_loads"] == 1


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One trained CRoFT model (1 epoch), evaluated both ways against 2 open-set datasets."""
    from launch import setup2

    base = tmp_path_factory.mktemp("onepass")
    data = str(base / "data")
    write_lodo_tree(data, per_class=4)
    write_all_openset(data)
    common = ["--root", data, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1", "--domains", "sketch",
              "--lambda2", "1", "--epochs", "1", "--shots", "2", "--output-root", str(base / "output"),
              "--launcher", "inprocess", "--ood", *OODS, "--", *TINY]
    cwd = os.getcwd()
    try:
        assert setup2.main(common, trainer="CRoFT") == 0
        for root, flags in (("one", []), ("sep", ["--eval-per-ood"])):
            argv = common[:common.index("--")] + ["--eval-root", str(base / root), *flags] + common[common.index("--"):]
            assert setup2.main(argv, trainer="CRoFT", evaluate=True) == 0
    finally:
        os.chdir(cwd)
    return base, common


def _eval_dirs(base, root):
    out = {}
    for dirpath, _, files in os.walk(base / root):
        if "record.json" in files:
            out[os.path.relpath(dirpath, base / root)] = dirpath
    return out


def test_one_pass_equals_one_run_per_open_set(sweep):
    base, _ = sweep
    one, sep = _eval_dirs(base, "one"), _eval_dirs(base, "sep")
    assert sorted(one) == sorted(sep) and len(one) == 2  # same run directories, one per open-set dataset
    for rel in one:
        _assert_same_run(sep[rel], one[rel])
        rec = _record(one[rel])
        assert_ood_matches_scores(one[rel], rec, SCORES)  # scikit-learn AUROC from the arrays
        assert os.path.isfile(os.path.join(one[rel], "done")) and os.path.getsize(os.path.join(one[rel],
                                                                                              "energy_hist.png")) > 1000
        log = open(os.path.join(one[rel], "log.txt")).read()
        assert "* accuracy:" in log and "OODD_FPR95:" in log and "One evaluation pass for 2 open-set runs" in log
        assert len(rec["shared_pass"]["runs"]) == 2
    # encoder passes: the pass encodes the ID side once; each record counts what it ran (the shared part: first)
    total = {root: sum(_record(d)["timings"]["encoder_images"] for d in dirs.values())
             for root, dirs in (("one", one), ("sep", sep))}
    any_dir = next(iter(sep.values()))
    n_test = _record(any_dir)["metrics"]["ood"]["knn"]["num_id"]  # KNN's ID side: every held-out image
    with np.load(os.path.join(any_dir, "scores.npz")) as z:
        n_val = len(z["val__labels"])
    assert total["sep"] - total["one"] == 2 * n_test + n_val  # accuracy, ID split and KNN bank: once, not twice


def test_plan_one_job_per_model_and_manifest_lists_every_run(sweep, capsys):
    from launch import setup2
    from launch.sweep import read_manifests

    base, common = sweep
    argv = common[:common.index("--")] + ["--eval-root", str(base / "one")]
    _, jobs = setup2.plan(argv, trainer="CRoFT", evaluate=True)
    _, per_ood = setup2.plan(argv + ["--eval-per-ood"], trainer="CRoFT", evaluate=True)
    assert len(jobs) == 1 and len(per_ood) == 2
    assert [p["output_dir"] for p in jobs[0].parts] == [j.output_dir for j in per_ood]
    assert jobs[0].argv.count("--eval-open-set") == 2 and "--output-dir" not in jobs[0].argv
    manifest = [j for j in read_manifests(str(base / "one")) if j["labels"]["kind"] == "eval"]
    assert sorted(j["output_dir"] for j in manifest) == sorted(j.output_dir for j in per_ood)
    assert sorted(j["labels"]["ood"] for j in manifest) == sorted(OODS)


def test_rerun_skips_and_a_deleted_done_reruns_only_its_run(sweep, capsys):
    from launch import collect, setup2

    base, common = sweep
    argv = common[:common.index("--")] + ["--eval-root", str(base / "one")] + common[common.index("--"):]
    dirs = _eval_dirs(base, "one")
    stamps = {rel: os.path.getmtime(os.path.join(d, "record.json")) for rel, d in dirs.items()}
    cwd = os.getcwd()
    try:
        assert setup2.main(argv, trainer="CRoFT", evaluate=True) == 0
        assert "2 runs planned, 2 already done, 0 to run (0 of 1 jobs)" in capsys.readouterr().out
        gone = next(rel for rel in dirs if "PACS_DTD_" in rel)
        before = _record(dirs[gone])
        os.remove(os.path.join(dirs[gone], "done"))
        collect.main("oodd", ["--root", str(base / "one")])
        assert "Missing runs (1):" in capsys.readouterr().out
        assert setup2.main(argv, trainer="CRoFT", evaluate=True) == 0
        assert "2 runs planned, 1 already done, 1 to run (1 of 1 jobs)" in capsys.readouterr().out
    finally:
        os.chdir(cwd)
    for rel, d in dirs.items():
        assert os.path.isfile(os.path.join(d, "done"))
        assert (os.path.getmtime(os.path.join(d, "record.json")) == stamps[rel]) is (rel != gone)
    after = _record(dirs[gone])
    _assert_close(before["metrics"], after["metrics"])
    assert after["shared_pass"]["built_with"] == "PACS_DTD" and after["shared_pass"]["position"] == 0


ZS = ["--seed", "1", "--trainer", "ZeroshotCLIP", "--config-file", "configs/trainers/ZeroshotCLIP/rn50_ep30.yaml",
      "--eval-only"]


@pytest.fixture(scope="module")
def zs_data(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("zsdata") / "d")
    write_lodo_tree(data, per_class=3)
    write_all_openset(data)
    return data


@pytest.mark.parametrize("extra", [[], ["DATALOADER.OOD_TEST.TRANSFORM", "train"],
                                   ["FEATURE_CACHE.ENABLED", "True"]], ids=["plain", "ood-augmented", "feature-cache"])
def test_train_py_one_pass_equals_separate_runs(zs_data, tmp_path, extra):
    """Also when the open-set images are augmented (random: drawn from the state a separate run has) and through
    the feature cache; the first open-set dataset is not the one the trainer is built with in every case."""
    opts = TINY + ["TEST_ENV", "sketch", *extra] + (["FEATURE_CACHE.DIR", str(tmp_path / "feat")]
                                                     if "FEATURE_CACHE.ENABLED" in extra else [])
    oods = ("Caltech101", "Food101", "DTD")
    for o in oods:
        run_cli(["--root", zs_data, *ZS, "--dataset-config-file", f"configs/datasets/PACS_{o}.yaml",
                 "--output-dir", str(tmp_path / "sep" / o), *opts])
    pairs = [a for o in oods for a in ("--eval-open-set", f"configs/datasets/PACS_{o}.yaml", str(tmp_path / "one" / o))]
    res = run_cli(["--root", zs_data, *ZS, *pairs, *opts])
    assert sorted(res["records"]) == sorted(str(tmp_path / "one" / o) for o in oods)
    for o in oods:
        _assert_same_run(str(tmp_path / "sep" / o), str(tmp_path / "one" / o))
    again = run_cli(["--root", zs_data, *ZS, *pairs, *opts])
    assert again["records"] == {} and len(again["skipped"]) == 3


def test_one_pass_refuses_runs_that_differ_in_more_than_the_open_set(zs_data, tmp_path):
    from dassl.utils.errors import ConfigError

    pairs = ["--eval-open-set", "configs/datasets/PACS_DTD.yaml", str(tmp_path / "a"),
             "--eval-open-set", os.path.join(COOP, "configs", "datasets", "DigitsDG_Textures.yaml"), str(tmp_path / "b")]
    with pytest.raises(ConfigError, match="differ in more than DATASET.NAME"):
        run_cli(["--root", zs_data, *ZS, *pairs, *TINY, "TEST_ENV", "sketch"])
    with pytest.raises(ConfigError, match="--eval-only"):
        run_cli(["--root", zs_data, *[a for a in ZS if a != "--eval-only"], *pairs[:3], *TINY])
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_one_pass_refuses_open_sets_with_different_id_splits():
    import train
    from dassl.data.datasets import Datum, DatasetBase

    def ds(test_paths):
        items = [Datum(impath=p, label=i % 2, classname=f"c{i % 2}") for i, p in enumerate(test_paths)]
        return DatasetBase(train_x=items[:2], val=items[:2], test=items)

    assert train._id_split_mismatch(ds(["a", "b", "c"]), ds(["a", "b", "c"])) == ""
    assert train._id_split_mismatch(ds(["a", "b", "c"]), ds(["a", "b", "d"])) == "test"


def test_one_pass_refuses_names_the_trainer_reads_differently():
    """CRoFT picks its semantics row from DATASET.NAME: official VLCS open sets agree; a non-official spelling
    (``VLCS_food101``: the generic row) may not share a pass with them."""
    import train

    def cfg(dataset):
        args = train.get_parser().parse_args(["--trainer", "CRoFT", "--dataset-config-file",
                                              os.path.join(COOP, "configs", "datasets", "VLCS_DTD.yaml")])
        c = train.setup_cfg(args)
        c.defrost()
        c.DATASET.NAME = dataset
        c.freeze()
        return c

    train.check_one_pass([cfg("VLCS_DTD"), cfg("VLCS_Food101"), cfg("VLCS_Caltech101")])
    with pytest.raises(train.ConfigError, match="builds its model differently"):
        train.check_one_pass([cfg("VLCS_DTD"), cfg("VLCS_food101")])
