"""The demo pipeline in miniature: real packaged data, a briefly pretrained tiny CLIP, 1 seed, 1 held-out domain."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from helpers import COOP

NEEDS = [m for m in ("mlxtend", "skimage") if importlib.util.find_spec(m) is None]
FASHION = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
NPM_OK = shutil.which("npm") is not None or os.path.isdir(os.path.join(os.path.dirname(COOP), ".cache", "npm"))

pytestmark = pytest.mark.skipif(bool(NEEDS) or not os.path.isdir(FASHION) or not NPM_OK,
                                reason=f"demo sources missing (python: {NEEDS}, Fashion-MNIST: "
                                       f"{os.path.isdir(FASHION)}, npm: {NPM_OK}); run `make test` as root")


def test_quick_demo_end_to_end(tmp_path, capsys):
    from demo.run import main

    cache = tmp_path / "cache"
    npm_cache = os.path.join(os.path.dirname(COOP), ".cache", "npm")
    if os.path.isdir(npm_cache):  # reuse the fetched npm tarball (sha256-checked by the pretraining tool)
        shutil.copytree(npm_cache, cache / "npm")
    cwd = os.getcwd()
    rc = main(["--cache", str(cache), "--quick", "--per-class", "30", "--pretrain-steps", "8",
               "--methods", "ZS-CLIP", "CoOp", "CRoFT", "--jobs", "1", "--epochs", "2"])
    assert os.getcwd() == cwd  # no global side effect on the caller's working directory
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "| method | setting | mnist | Avg | seeds |" in out
    assert "FashionMNIST AUROC↑" in out and "Textures FPR95↓" in out
    for method in ("ZS-CLIP", "CoOp", "CRoFT"):
        assert f"| {method} |" in out
    assert os.path.isfile(cache / "demo-quick" / "setup2_oodg.csv")
    assert any(f.startswith("energy_") and f.endswith(".png") for f in os.listdir(cache / "demo-quick"))
    # a second run re-uses everything and only re-prints
    capsys.readouterr()
    rc = main(["--cache", str(cache), "--quick", "--per-class", "30", "--pretrain-steps", "8",
               "--methods", "ZS-CLIP", "CoOp", "CRoFT", "--jobs", "1", "--epochs", "2"])
    out2 = capsys.readouterr().out
    assert rc == 0 and "0 to run" in out2 and "[reuse]" in out2
