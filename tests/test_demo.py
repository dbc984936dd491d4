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
    readme = tmp_path / "demo.md"
    readme.write_text("intro\n<!-- demo:start -->\nOLD-PLACEHOLDER\n<!-- demo:end -->\nrest\n", encoding="utf-8")
    front = tmp_path / "README.md"
    front.write_text("top\n<!-- headline:start -->\nOLD\n<!-- headline:end -->\nend\n", encoding="utf-8")
    argv = ["--cache", str(cache), "--quick", "--per-class", "30", "--pretrain-steps", "8", "--methods", "ZS-CLIP",
            "CoOp", "CRoFT", "--jobs", "1", "--epochs", "2", "--readme", str(readme), "--headline", str(front),
            "--figures", str(tmp_path / "fig")]
    cwd = os.getcwd()
    rc = main(argv)
    assert os.getcwd() == cwd  # no global side effect on the caller's working directory
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "| method | mnist | Avg | seeds |" in out
    for score in ("energy", "MCM", "MSP", "KNN", "GL-MCM"):
        assert f"Open-set detection with the {score} score" in out
    for method in ("ZS-CLIP", "CoOp", "CRoFT", "CRoFT λ2=1", "CRoFT λ2=100", "CRoFT (fixed)"):
        assert f"| {method} |" in out
    assert "Paired differences CRoFT − method" in out and "**Verdict: inconclusive.**" in out  # 1 pair: no interval
    assert os.path.isfile(cache / "demo-quick" / "setup2_oodg.csv")
    for png in ("effects", "lambda2_sensitivity", "hist_energy", "hist_mcm", "roc_energy", "coop_energy_parts"):
        assert (tmp_path / "fig" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"](fig/{png}.png)" in readme.read_text(encoding="utf-8")
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n<!-- demo:start -->\n") and text.endswith("<!-- demo:end -->\nrest\n")
    assert "OLD-PLACEHOLDER" not in text
    # the README headline comes from the same numbers: its verdict line is the section's
    head = front.read_text(encoding="utf-8")
    assert head.startswith("top\n<!-- headline:start -->\n") and head.endswith("<!-- headline:end -->\nend\n")
    verdict_line = next(ln for ln in text.splitlines() if ln.startswith("**Verdict:"))
    assert verdict_line in head and "](fig/effects.png)" in head and "| method | held-out accuracy % |" in head
    # every stage's wall-clock seconds on the last line
    last = out.strip().splitlines()[-1]
    assert last.startswith("stage timings (wall s): data ")
    for stage in ("tiny CLIP", "training", "evaluation", "report"):
        assert f", {stage} " in last
    # the runs skip their start-up image decode and per-run histogram (docs/demo.md, "No redundant work per run")
    import glob
    import json

    evals = glob.glob(str(cache / "demo-quick" / "eval_open_ood" / "*" / "*" / "*" / "seed1" / "record.json"))
    assert len(evals) == 12
    for path in evals:
        cfg = json.load(open(path))["config"]
        assert cfg["DATASET"]["VERIFY_IMAGES"] is False and cfg["TEST"]["SAVE_PLOTS"] is False
        assert not os.path.exists(os.path.join(os.path.dirname(path), "energy_hist.png"))
    # the report names the CPU that computed the rows
    import torch

    assert f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}" in text.split("Rows computed on: ")[1]
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
    # a run compared with itself: nothing moved, same verdict (python -m demo.compare A B, exit 0)
    from demo import compare

    assert compare.main([str(cache), str(cache), "--variant", "demo-quick"]) == 0
    out3 = capsys.readouterr().out
    # 6 trained models x 2 open sets
    assert "| held-out accuracy | 12 | 0.00 | 0.00 |" in out3 and "verdict lines identical" in out3
    # other settings in the same cache folder: refused before anything runs, then replaced with --rerun-changed
    with pytest.raises(SystemExit, match="holds a run of another configuration .*OPTIM.MAX_EPOCH: 2 -> 3"):
        main([*argv, "--epochs", "3"])
    rc = main([*argv, "--epochs", "3", "--methods", "ZS-CLIP", "--rerun-changed"])
    out4 = capsys.readouterr().out
    assert rc == 0 and "1 runs planned, 0 already done, 1 to run; 1 of them replace a run" in out4
    assert main([*argv, "--epochs", "3", "--methods", "ZS-CLIP"]) == 0 and "0 to run" in capsys.readouterr().out


@pytest.mark.slow
def test_a_second_cold_run_gives_the_same_report(tmp_path, capsys):
    """docs/demo.md: two cold runs on one CPU give the same report, character for character, and the same bits in
    every run's saved scores. Two quick demos in separate cache folders, two workers each (jobs land on either),
    with the shipped tiny CLIP."""
    from demo import compare
    from demo.run import main

    caches, texts = [tmp_path / "a", tmp_path / "b"], []
    for cache in caches:
        assert main(["--cache", str(cache), "--quick", "--per-class", "30", "--methods", "ZS-CLIP", "CoOp", "CRoFT",
                     "--jobs", "2", "--epochs", "2"]) == 0
        out = capsys.readouterr().out
        texts.append(out[out.index("## DigitsDG-mini"):out.index("demo finished")].replace(str(cache), "CACHE"))
    assert texts[0] == texts[1]
    assert compare.main([*map(str, caches), "--variant", "demo-quick", "--bitwise"]) == 0
    out = capsys.readouterr().out
    assert "| held-out accuracy | 12 | 0.00 | 0.00 |" in out
    assert "12 of 12 runs bit-identical" in out  # every cached feature encoded in a batch of ENCODE_BATCH images


def test_locoop_trains_first_on_one_pool_of_one_thread_workers(tmp_path):
    """docs/demo.md: one pool of workers for training and evaluation (kept alive between them), every job on one
    torch thread, and LoCoOp (which trains on local features) planned before the other methods."""
    from demo import methods as M
    from demo.run import get_parser, one_thread_workers, plan_all, resolve

    pool = one_thread_workers(2)
    assert pool.keep_alive is True and pool.options.jobs == 2 and pool._threads([], 0) == 1
    data = tmp_path / "data" / "DigitsDG"
    data.mkdir(parents=True)
    for dom in ("mnist", "inkpaper"):
        (data / f"test_on_{dom}.json").write_text("{}", encoding="utf-8")
    args = get_parser().parse_args(["--cache", str(tmp_path), "--seeds", "1"])
    args.argv = []
    resolve(args)
    roots = (str(tmp_path / "out"), str(tmp_path / "eval"))
    train = plan_all(args, str(tmp_path / "data"), "w.pt", roots, evaluate=False)
    order = list(dict.fromkeys(j.labels["method"] for j in train))
    assert order[0] == "LoCoOp" and sorted(order) == sorted(m.label for m in M.METHODS)
    assert len(train) == 2 * (len(M.METHODS) + 2)  # 2 domains x (9 methods, CRoFT with 3 λ2 values)
