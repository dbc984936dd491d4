"""One evaluation pass over several open-set datasets (``train.py --eval-open-set``, the Setup-II default) gives
the records and arrays of one run per (model, open-set dataset) (``--eval-per-ood``), skips done directories and
reruns only the ones whose ``done`` is gone; also under the official draw order when the open sets draw different
ID samples (each then gets its own ID side), with images encoded once (the in-memory memo, test transform only)."""
from __future__ import annotations

import json
import os
import shutil

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
        # bitwise: one process, the pass feeds each split in the batches a separate run has, and a feature served
        # by the memo was encoded in a batch of the same images (or, with batch size 1, alone, as here too)
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
    # separate runs encode the held-out images twice each (accuracy, ID split) and the KNN bank once; the pass
    # encodes both once (the ID split's features come from the accuracy pass's memo): 2 x 2 - 1 = 3 and 2 - 1 = 1
    assert total["sep"] - total["one"] == 3 * n_test + n_val
    assert [_record(d)["shared_pass"]["id_side"] for d in one.values()] == ["shared", "shared"]


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


def test_id_split_mismatch_names_the_first_differing_split():
    """The pass refuses open sets whose ``train_x`` differs (``_open_set_data``) and gives an open set whose
    ``val`` / ``test`` differ its own ID side (``_open_set_run``); both read this comparison."""
    from dassl.data.datasets import Datum, DatasetBase
    from dassl.engine.onepass import _id_split_mismatch

    def ds(test_paths, train=("a", "b")):
        items = [Datum(impath=p, label=i % 2, classname=f"c{i % 2}") for i, p in enumerate(test_paths)]
        train_x = [Datum(impath=p, label=i % 2, classname=f"c{i % 2}") for i, p in enumerate(train)]
        return DatasetBase(train_x=train_x, val=items[:2], test=items)

    assert _id_split_mismatch(ds(["a", "b", "c"]), ds(["a", "b", "c"])) == ""
    assert _id_split_mismatch(ds(["a", "b", "c"]), ds(["a", "b", "d"])) == "test"
    assert _id_split_mismatch(ds(["a", "b", "c"]), ds(["a", "b", "d"]), ("train_x",)) == ""
    assert _id_split_mismatch(ds(["a", "b", "c"]), ds(["a", "b", "c"], ("a", "x")), ("train_x",)) == "train_x"


def test_one_pass_refuses_an_open_set_with_another_train_x(zs_data):
    """Open sets of one ID dataset share ``train_x`` (drawn before anything else) and may share a pass; another
    held-out domain (another json train list) may not: one line naming the split."""
    from types import SimpleNamespace

    import datasets  # noqa: F401  (registers the dataset classes)
    from dassl.config import get_cfg_default
    from dassl.data.datasets import build_dataset
    from dassl.engine.onepass import _open_set_data
    from dassl.utils.errors import DataError

    def cfg(name, env):
        c = get_cfg_default()
        c.DATASET.ROOT, c.DATASET.NAME, c.TEST_ENV, c.SEED, c.INPUT.SIZE = zs_data, name, env, 1, (32, 32)
        return c

    trainer = SimpleNamespace(dm=SimpleNamespace(dataset=build_dataset(cfg("PACS_DTD", "sketch"))),
                              cfg=cfg("PACS_DTD", "sketch"))
    ds, _ = _open_set_data(cfg("PACS_Caltech101", "sketch"), trainer)
    assert [d.impath for d in ds.train_x] == [d.impath for d in trainer.dm.dataset.train_x]
    with pytest.raises(DataError, match="PACS_DTD and PACS_DTD draw different ID train_x lists"):
        _open_set_data(cfg("PACS_DTD", "photo"), trainer)


def test_one_pass_refuses_names_the_trainer_reads_differently():
    """CRoFT picks its semantics row from DATASET.NAME: official VLCS open sets agree; a non-official spelling
    (``VLCS_food101``: the generic row) may not share a pass with them."""
    import train
    from dassl.engine.onepass import check_one_pass

    def cfg(dataset):
        args = train.get_parser().parse_args(["--trainer", "CRoFT", "--dataset-config-file",
                                              os.path.join(COOP, "configs", "datasets", "VLCS_DTD.yaml")])
        c = train.setup_cfg(args)
        c.defrost()
        c.DATASET.NAME = dataset
        c.freeze()
        return c

    check_one_pass([cfg("VLCS_DTD"), cfg("VLCS_Food101"), cfg("VLCS_Caltech101")])
    with pytest.raises(train.ConfigError, match="builds its model differently"):
        check_one_pass([cfg("VLCS_DTD"), cfg("VLCS_food101")])


# ---------------------------------------------------------- the official draw order: open sets with their own ID side
# Small caps make the official order bite: the open-set cap draws first, so each open set draws other held-out
# (test) and source (val) samples. Test batch size 1: every image is encoded alone in both flows, so a feature the
# memo serves is the very computation a separate run makes (bitwise; see the default-batch test below otherwise).
CAPS = ["DATASET.ID_PER_CLASS_CAP", "2", "DATASET.OOD_PER_CLASS_CAP", "3"]


def _clear_fewshot_caches(data):
    for folder in ("dtd", "food-101", "caltech-101"):
        shutil.rmtree(os.path.join(data, folder, "split_fewshot"), ignore_errors=True)


def _dataset_config(tmp_path, ood):
    """The shipped ``PACS_<ood>.yaml``, or one written here (e.g. the official spelling ``PACS_food101``)."""
    shipped = os.path.join(COOP, "configs", "datasets", f"PACS_{ood}.yaml")
    if os.path.isfile(shipped):
        return shipped
    path = tmp_path / f"PACS_{ood}.yaml"
    path.write_text(f'DATASET:\n  NAME: "PACS_{ood}"\n')
    return str(path)


def _pass_and_separate(data, tmp_path, oods, opts, head=ZS):
    """Separate runs, then one pass, each from the same few-shot cache state (none: K >= 1 draws and writes it)."""
    configs = {o: _dataset_config(tmp_path, o) for o in oods}
    for o in oods:
        _clear_fewshot_caches(data)
        run_cli(["--root", data, *head, "--dataset-config-file", configs[o], "--output-dir", str(tmp_path / "sep" / o),
                 *opts])
    _clear_fewshot_caches(data)
    pairs = [a for o in oods for a in ("--eval-open-set", configs[o], str(tmp_path / "one" / o))]
    res = run_cli(["--root", data, *head, *pairs, *opts])
    _clear_fewshot_caches(data)
    return res


def _test_paths(d):
    with np.load(os.path.join(d, "scores.npz")) as z:
        return list(z["test__impaths"])


@pytest.mark.parametrize("extra", [[], ["DATALOADER.OOD_TEST.TRANSFORM", "test"], ["DATASET.NUM_SHOTS", "2"],
                                   ["FEATURE_CACHE.ENABLED", "True"]],
                         ids=["ood-augmented", "ood-test-transform", "k-shot", "feature-cache"])
def test_official_order_one_pass_equals_separate_runs(zs_data, tmp_path, extra):
    oods = ("DTD", "Caltech101")
    cached = "FEATURE_CACHE.ENABLED" in extra
    opts = TINY + ["TEST_ENV", "sketch", "DATALOADER.TEST.BATCH_SIZE", "1", *CAPS, *extra] + (
        ["FEATURE_CACHE.DIR", str(tmp_path / "feat")] if cached else [])
    res = _pass_and_separate(zs_data, tmp_path, oods, opts)
    assert len(res["records"]) == 2
    for o in oods:
        _assert_same_run(str(tmp_path / "sep" / o), str(tmp_path / "one" / o))
    recs = {o: _record(tmp_path / "one" / o) for o in oods}
    # the official order really gave the second open set other held-out samples, and so its own ID side
    tests = {o: _test_paths(tmp_path / "one" / o) for o in oods}
    assert tests["DTD"] != tests["Caltech101"]
    assert [recs[o]["shared_pass"]["id_side"] for o in oods] == ["shared", "own"]
    assert {recs[o]["protocol"]["dataset"]["open_set"]["draw_order"] for o in oods} == {"official"}
    if "DATASET.NUM_SHOTS" in extra:  # both flows drew the open-set few-shot sample (no cache) and wrote it
        assert {_record(tmp_path / r / o)["data"]["open_set"]["fewshot_cache"]["state"]
                for r in ("sep", "one") for o in oods} == {"written"}
    if cached:  # the feature cache serves every feature (the own ID side through its own loaders): no memo
        assert {recs[o]["shared_pass"]["memo"] for o in oods} == {"off: the feature cache serves the features"}
        assert all(recs[o]["feature_cache"]["hits"] > 0 for o in oods)
        return
    # ... whose images the pass had mostly encoded already: served from memory, never encoded twice
    assert all(recs[o]["shared_pass"]["memo_served"] > 0 for o in oods)
    enc = {root: sum(_record(tmp_path / root / o)["timings"]["encoder_images"] for o in oods)
           for root in ("sep", "one")}
    distinct_id = len({p for o in oods for p in tests[o]}) + len({p for o in oods
                                                                  for p in _val_paths(tmp_path / "one" / o)})
    n_ood = sum(len(_ood_paths(tmp_path / "one" / o)) for o in oods)
    assert enc["one"] == distinct_id + n_ood  # every ID image once, every open-set image once (distinct per open set)
    assert enc["sep"] > enc["one"]


def _val_paths(d):
    with np.load(os.path.join(d, "scores.npz")) as z:
        return list(z["val__impaths"])


def _ood_paths(d):
    with np.load(os.path.join(d, "scores.npz")) as z:
        return list(z["ood_test__impaths"])


def test_id_first_order_shares_the_id_side(zs_data, tmp_path):
    """The named deviation: ID samples drawn before the open set, so every open set shares the pass's ID side."""
    oods = ("DTD", "Food101")
    opts = TINY + ["TEST_ENV", "sketch", *CAPS, "DATASET.OPENSET_DRAW_ORDER", "id_first"]
    _pass_and_separate(zs_data, tmp_path, oods, opts)
    for o in oods:
        _assert_same_run(str(tmp_path / "sep" / o), str(tmp_path / "one" / o))
        rec = _record(tmp_path / "one" / o)
        assert rec["shared_pass"]["id_side"] == "shared" and rec["protocol"]["dataset"]["open_set"]["draw_order"] == \
            "id_first" and "DATASET.OPENSET_DRAW_ORDER" in rec["protocol"]["fixed"]
    assert _test_paths(tmp_path / "one" / "DTD") == _test_paths(tmp_path / "one" / "Food101")


@pytest.mark.slow
def test_official_order_default_batches_match_to_float_precision(zs_data, tmp_path):
    """With the default test batch size the memo serves features encoded in other batch compositions, which a
    CPU kernel may round differently (float32, about 1e-7 relative): arrays match to 1e-5, the samples exactly."""
    oods = ("DTD", "Caltech101")
    _pass_and_separate(zs_data, tmp_path, oods, TINY + ["TEST_ENV", "sketch", *CAPS])
    for o in oods:
        with np.load(tmp_path / "sep" / o / "scores.npz") as a, np.load(tmp_path / "one" / o / "scores.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                if a[k].dtype.kind in "fc":
                    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
                else:
                    assert np.array_equal(a[k], b[k]), k
    assert _record(tmp_path / "one" / "Caltech101")["shared_pass"]["id_side"] == "own"


@pytest.mark.parametrize("transform", ["train", "test"])
def test_memo_serves_only_test_transform_images(zs_data, tmp_path, transform):
    """``PACS_Food101`` and ``PACS_food101`` are the same images: under the test transform the second run's open
    set is served from memory; under the (random) training transform it is encoded again, from the random state a
    separate run has (so the records still equal separate runs)."""
    oods = ("Food101", "food101")
    res = _pass_and_separate(zs_data, tmp_path, oods, TINY + ["TEST_ENV", "sketch",
                                                               "DATALOADER.OOD_TEST.TRANSFORM", transform])
    assert len(res["records"]) == 2
    for o in oods:
        _assert_same_run(str(tmp_path / "sep" / o), str(tmp_path / "one" / o))
    second = _record(tmp_path / "one" / "food101")
    n_ood = len(_ood_paths(tmp_path / "one" / "food101"))
    assert second["shared_pass"]["id_side"] == "shared"  # nothing else of the second run goes through the memo
    assert second["shared_pass"]["memo_served"] == (n_ood if transform == "test" else 0)
    assert second["timings"]["encoder_images"] == (0 if transform == "test" else n_ood)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["BCAL", "DPLCLIP"])
def test_official_order_one_pass_for_noisy_and_batch_dependent_trainers(zs_data, tmp_path, trainer):
    """Bayes-CAL draws prompt noise in every evaluation forward (official) and DPLCLIP builds its test-time prompts
    from each batch's domains: an open set with its own ID side replays a separate run's random stream and
    batches, with only the frozen encoder's features served from memory (untrained prompts: no --model-dir)."""
    head = ["--seed", "1", "--trainer", trainer, "--config-file", f"configs/trainers/{trainer}/rn50_ep30.yaml",
            "--eval-only"]
    oods = ("DTD", "Caltech101")
    _pass_and_separate(zs_data, tmp_path, oods, TINY + ["TEST_ENV", "sketch", "DATALOADER.TEST.BATCH_SIZE", "1",
                                                        *CAPS], head)
    for o in oods:
        _assert_same_run(str(tmp_path / "sep" / o), str(tmp_path / "one" / o))
    rec = _record(tmp_path / "one" / "Caltech101")
    assert rec["shared_pass"]["id_side"] == "own" and rec["shared_pass"]["memo_served"] > 0
