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
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo:start -->\nold\n<!-- demo:end -->\nrest\n", encoding="utf-8")
    argv = ["--cache", str(cache), "--quick", "--per-class", "30", "--pretrain-steps", "8", "--methods", "ZS-CLIP",
            "CoOp", "CRoFT", "--jobs", "1", "--epochs", "2", "--readme", str(readme), "--figures", str(tmp_path / "fig")]
    cwd = os.getcwd()
    rc = main(argv)
    assert os.getcwd() == cwd  # no global side effect on the caller's working directory
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "| method | mnist | Avg | seeds |" in out
    for score in ("energy", "MCM", "MSP", "KNN"):
        assert f"Open-set detection with the {score} score" in out
    for method in ("ZS-CLIP", "CoOp", "CRoFT", "CRoFT λ2=1", "CRoFT λ2=100", "CRoFT (fixed)"):
        assert f"| {method} |" in out
    assert "Paired differences CRoFT − method" in out and "**Summary.**" in out
    assert os.path.isfile(cache / "demo-quick" / "setup2_oodg.csv")
    for png in ("lambda2_sensitivity", "hist_energy", "hist_mcm", "roc_energy", "coop_energy_parts"):
        assert (tmp_path / "fig" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"](fig/{png}.png)" in readme.read_text(encoding="utf-8")
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n<!-- demo:start -->\n") and text.endswith("<!-- demo:end -->\nrest\n")
    assert "old" not in text
    # the Setup-II collector writes the same kind of figures with --plots
    from launch import collect

    assert collect.main("oodd", ["--root", str(cache / "demo-quick" / "eval_open_ood"), "--plots",
                                 str(tmp_path / "plots")]) == 0
    assert "figure written" in capsys.readouterr().out
    assert {"lambda2_sensitivity.png", "hist_energy.png", "roc_mcm.png"} <= set(os.listdir(tmp_path / "plots"))
    # a second run re-uses everything and only re-prints
    capsys.readouterr()
    rc = main(argv)
    out2 = capsys.readouterr().out
    assert rc == 0 and "0 to run" in out2 and "[reuse]" in out2
