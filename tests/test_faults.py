"""Bad inputs and numerical faults: each is refused with one line on stderr, exit != 0, nothing marked done.

Runs are forked children of this (warmed-up) interpreter (:mod:`procs`), so each costs a run, not a start-up.
One synthetic PACS tree and one short CRoFT training are shared by the module.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from helpers import TINY
from procs import kill_when, run_train_forked, train_starter, wait_forked
from synthetic import write_lodo_tree

CRoFT_CFG = "configs/trainers/CRoFT/rn50_ep30.yaml"
PACS_CFG = "configs/datasets/PACS.yaml"
FAST = ["OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "DATALOADER.TEST.BATCH_SIZE", "16"]


@pytest.fixture(scope="module", autouse=True)
def _warm():
    import train  # noqa: F401  (imported once here; forked children inherit it)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    write_lodo_tree(str(r), per_class=4)
    return str(r)


def args(root: str, out: str, trainer: str = "CRoFT", config: str = CRoFT_CFG, flags=(), extra=()) -> list[str]:
    return (["--root", root, "--seed", "1", "--trainer", trainer, "--dataset-config-file", PACS_CFG,
             "--config-file", config, "--output-dir", out, *flags, *TINY, "VERBOSE", "False", "TEST_ENV", "sketch",
             *FAST, *extra])


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    """A finished 2-epoch CRoFT run with default keys (checkpoints: best and the last epoch's)."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    res = run_train_forked(args(root, out), os.path.dirname(out))
    assert res.returncode == 0, res.stderr
    return out


def refused(res, out: str, code: int = 2, needle: str = "") -> str:
    """Exit ``code``, exactly one stderr line (no traceback), no record.json / done in ``out``."""
    lines = res.error_lines()
    assert res.returncode == code, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert not os.path.exists(os.path.join(out, "record.json")) and not os.path.exists(os.path.join(out, "done"))
    assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ non-finite guard
def test_diverging_loss_stops_with_exit_3(root, tmp_path):
    out = str(tmp_path / "lr")
    res = run_train_forked(args(root, out, extra=["OPTIM.LR", "1e30"]), str(tmp_path))
    line = refused(res, out, code=3, needle="non-finite")
    assert "epoch 2 batch 1" in line  # epoch 1 still finite with this tree and seed; its checkpoint is kept
    ckpt = torch.load(os.path.join(out, "clip_adapter", "model.pth.tar-1"), weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not os.path.exists(os.path.join(out, "clip_adapter", "model.pth.tar-2"))


def test_nan_logits_at_evaluation_exit_3(root, trained, tmp_path):
    model_dir = str(tmp_path / "nanmodel")
    shutil.copytree(trained, model_dir)
    path = os.path.join(model_dir, "clip_adapter", "model.pth.tar-2")
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"] = {k: torch.full_like(v, float("nan")) for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, path)
    out = str(tmp_path / "eval")
    res = run_train_forked(args(root, out, flags=["--eval-only", "--model-dir", model_dir, "--load-epoch", "2"]),
                           str(tmp_path))
    refused(res, out, code=3, needle="non-finite logits")


def test_guard_names_the_terms():
    from dassl.engine.guards import NonFiniteError, check_train_step

    class T:
        epoch, batch_idx = 4, 6
        _models = {"m": torch.nn.Linear(2, 2)}

    check_train_step(T(), {"loss": 1.0, "acc": 50.0})
    with pytest.raises(NonFiniteError, match=r"epoch 5 batch 7: ce, edr_L2"):
        check_train_step(T(), {"loss": 1.0, "ce": float("nan"), "edr_L2": float("inf")})
    T._models["m"].weight.grad = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    with pytest.raises(NonFiniteError, match=r"grad of m.weight"):
        check_train_step(T(), {"loss": 1.0})


# ------------------------------------------------------------------ bad data (split entries, images)
def _tree_with(root: str, tmp_path, edit) -> str:
    """A copy of the shared tree whose ``test_on_sketch.json`` went through ``edit(dict)``."""
    new = str(tmp_path / "data")
    shutil.copytree(root, new)
    path = os.path.join(new, "PACS", "test_on_sketch.json")
    with open(path, encoding="utf-8") as f:
        split = json.load(f)
    edit(split)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(split, f)
    return new


def _set_label(entry_list, i, label):
    entry_list[i] = [entry_list[i][0], label, entry_list[i][2]]


@pytest.mark.parametrize("case,needle", [
    ("label_99", "label out of range [0, 3)"),
    ("label_negative", "label out of range [0, 3)"),
    ("classname_clash", "one class name per label"),
    ("duplicate_path", "must not share images"),
    ("missing_image", "image not found"),
])
def test_bad_split_entry_is_one_line(case, needle, root, tmp_path):
    def edit(split):
        if case == "label_99":
            _set_label(split["train"], 3, 99)
        elif case == "label_negative":
            _set_label(split["val"], 0, -1)
        elif case == "classname_clash":
            split["test"][0] = [split["test"][0][0], split["test"][0][1], "zebra"]
        elif case == "duplicate_path":
            split["val"].append(split["test"][5])
        else:
            split["train"][2] = ["photo/dog/nope.png", 0, "dog"]

    data = _tree_with(root, tmp_path, edit)
    out = str(tmp_path / "o")
    line = refused(run_train_forked(args(data, out), str(tmp_path)), out, needle=needle)
    assert "test_on_sketch.json" in line and "entry" in line
    assert not os.path.exists(out)


@pytest.mark.parametrize("case", ["non_image_bytes", "truncated_png", "corrupt_png"])
def test_unreadable_used_image_is_one_line(case, root, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(root, data)
    img = os.path.join(data, "PACS", "images", "sketch", "dog", "dog_001.png")  # a test image: always used
    raw = open(img, "rb").read()
    bad = {"non_image_bytes": b"%PDF-1.4 not an image at all\n" * 20, "truncated_png": raw[: len(raw) // 2],
           "corrupt_png": raw[:16] + bytes(len(raw) - 16)}[case]
    with open(img, "wb") as f:
        f.write(bad)
    out = str(tmp_path / "o")
    refused(run_train_forked(args(data, out, trainer="ZeroshotCLIP", config="configs/trainers/ZeroshotCLIP/rn50_ep30.yaml",
                                  flags=["--eval-only"]), str(tmp_path)), out, needle="dog_001.png")


# ------------------------------------------------------------------ bad settings and missing files
@pytest.mark.parametrize("case,extra,needle", [
    ("croft_ratio_7", ["TRAINER.CRoFT.ratio", "7"], "TRAINER.CRoFT.ratio = 7.0 is out of range: expected a finite "
                                                    "number in [0, 1]"),
    ("negative_lambda", ["TRAINER.CRoFT.lambda2", "-5"], "TRAINER.CRoFT.lambda2 = -5.0 is out of range"),
    ("lr_zero", ["OPTIM.LR", "0.0"], "OPTIM.LR = 0.0 is out of range: expected a finite number > 0"),
    ("lr_infinite", ["OPTIM.LR", "1e999"], "OPTIM.LR = inf is out of range"),
    ("batch_size_zero", ["DATALOADER.TRAIN_X.BATCH_SIZE", "0"], "DATALOADER.TRAIN_X.BATCH_SIZE = 0"),
    ("bad_precision", ["TRAINER.CRoFT.PREC", "fp8"], "expected one of fp32, fp16, amp, bf16"),
    ("bad_device", ["DEVICE", "gpu0"], "DEVICE = 'gpu0' is out of range"),
    ("unknown_key", ["TRAINER.CRoFT.ratioo", "0.2"], "TRAINER.CRoFT.ratioo"),
    ("wrong_type", ["OPTIM.MAX_EPOCH", "'ten'"], "OPTIM.MAX_EPOCH"),
    ("missing_root", ["DATASET.ROOT", "/nonexistent/data"], "/nonexistent/data"),
    ("missing_split", ["TEST_ENV", "mars"], "test_on_mars.json"),
    ("missing_weights", ["MODEL.BACKBONE.WEIGHTS", "/nonexistent/RN50.pt"], "/nonexistent/RN50.pt"),
])
def test_bad_setting_is_one_line(case, extra, needle, root, tmp_path):
    out = str(tmp_path / "o")
    refused(run_train_forked(args(root, out, extra=extra), str(tmp_path)), out, needle=needle)
    assert not os.path.exists(out)


def test_malformed_split_json(root, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(root, data)
    with open(os.path.join(data, "PACS", "test_on_sketch.json"), "w") as f:
        f.write('{"train": [["photo/dog/dog_000.png", 0, "dog"],')
    out = str(tmp_path / "o")
    refused(run_train_forked(args(data, out), str(tmp_path)), out, needle="malformed JSON")


@pytest.mark.parametrize("case", ["missing_model_dir", "missing_epoch"])
def test_eval_missing_model(case, root, trained, tmp_path):
    flags = {"missing_model_dir": ["--model-dir", str(tmp_path / "nowhere")],
             "missing_epoch": ["--model-dir", trained, "--load-epoch", "9"]}[case]
    out = str(tmp_path / "o")
    needle = "nowhere" if case == "missing_model_dir" else "model.pth.tar-9"
    refused(run_train_forked(args(root, out, flags=["--eval-only", *flags]), str(tmp_path)), out, needle=needle)


# ------------------------------------------------------------------ resume
def _record(out: str) -> dict:
    with open(os.path.join(out, "record.json"), encoding="utf-8") as f:
        return json.load(f)


def same_run(a: str, b: str) -> None:
    """Two run directories hold the same result: every epoch checkpoint, best epoch, val history, metrics."""
    ra, rb = _record(a), _record(b)
    assert (ra["best_epoch"], ra["val_history"], ra["metrics"]) == (rb["best_epoch"], rb["val_history"],
                                                                    rb["metrics"])
    assert os.path.isfile(os.path.join(b, "done"))
    for model in ("clip_adapter", "generator"):
        names = sorted(f for f in os.listdir(os.path.join(a, model)) if f.startswith("model"))
        assert names == sorted(f for f in os.listdir(os.path.join(b, model)) if f.startswith("model"))
        for f in names:
            sa = torch.load(os.path.join(a, model, f), weights_only=False)
            sb = torch.load(os.path.join(b, model, f), weights_only=False)
            assert sa["epoch"] == sb["epoch"] and sa["best_epoch"] == sb["best_epoch"]
            for k in sa["state_dict"]:  # bitwise: forked runs, 1 thread each, the same batches on one machine
                assert torch.equal(sa["state_dict"][k], sb["state_dict"][k]), (f, k)


def test_record_has_best_epoch_and_val_history(trained):
    rec = _record(trained)
    assert [h["epoch"] for h in rec["val_history"]] == [1, 2]
    best = max(rec["val_history"], key=lambda h: h["accuracy"])  # first maximum wins (strict improvement)
    assert rec["best_epoch"] == best["epoch"]
    assert rec["metrics"]["val"]["best_accuracy"] == best["accuracy"]


def test_truncated_last_checkpoint_falls_back_to_previous(root, trained, tmp_path):
    """Default keys keep best + last: a truncated last checkpoint falls back to model-best (the full state of the
    best epoch), which becomes the rolling checkpoint again; the run then equals the uninterrupted one."""
    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    for f in ("record.json", "done"):
        os.unlink(os.path.join(out, f))
    last = os.path.join(out, "clip_adapter", "model.pth.tar-2")
    raw = open(last, "rb").read()
    with open(last, "wb") as f:
        f.write(raw[: len(raw) // 3])
    res = run_train_forked(args(root, out), str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "WARNING: skipping an unreadable checkpoint" in res.stdout and "model.pth.tar-2" in res.stdout
    assert f'model-best.pth.tar" (epoch = {_record(trained)["best_epoch"]})' in res.stdout
    same_run(trained, out)


# ------------------------------------------------------------------ kill -9 anywhere (fast representative)
def test_kill9_during_training_then_rerun_equals_uninterrupted(root, trained, tmp_path):
    """Two kill -9 of a CRoFT run with default keys (once its log exists, once epoch 1's rolling checkpoint does,
    each after a random delay), then a rerun: same checkpoints, best epoch, history, metrics; one log."""
    out = str(tmp_path / "killed")
    start = train_starter(args(root, out), str(tmp_path))
    rng = random.Random(14)
    hits = 0
    for marker in ("log.txt", os.path.join("clip_adapter", "model.pth.tar-1")):
        pid, o, e = start()
        hits += kill_when(pid, lambda m=marker: os.path.exists(os.path.join(out, m)), rng.uniform(0, 0.2))
        wait_forked(pid, o, e)
    assert hits >= 1
    res = wait_forked(*start())
    assert res.returncode == 0, res.stderr
    same_run(trained, out)
    assert [f for f in os.listdir(out) if f.startswith("log.txt")] == ["log.txt"]
    # the record's training segments: contiguous epochs 0 -> 2, started = the first segment's start
    rec = _record(out)
    segs = rec["segments"]
    assert segs[0]["from_epoch"] == 0 and segs[-1]["to_epoch"] == 2 and rec["started"] == segs[0]["started"]
    assert all(a["to_epoch"] == b["from_epoch"] for a, b in zip(segs, segs[1:]))
    assert all(s["epochs"] == s["to_epoch"] - s["from_epoch"] for s in segs)
    assert rec["timings"]["total_seconds"] >= sum(s["seconds"] for s in segs)


def test_sweep_reports_a_diverging_run_as_failed(root, tmp_path, capsys):
    """A run stopped by the non-finite guard is a failed sweep run: exit 1, listed, no done (rerun next time)."""
    from launch import setup2

    out = str(tmp_path / "sweep")
    common = ["--root", root, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1", "--domains", "sketch",
              "--lambda2", "1", "--epochs", "3", "--shots", "2", "--output-root", out, "--launcher", "inprocess",
              "--", *TINY, "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.LR", "1e30"]
    cwd = os.getcwd()
    try:
        assert setup2.main(common, trainer="CRoFT") == 1
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert "1 of 1 runs failed" in captured.out and "non-finite" in captured.out + captured.err
    assert not [dp for dp, _, fs in os.walk(out) if "done" in fs or "record.json" in fs]


# ------------------------------------------------------------------ live logs
def test_log_is_live_under_the_workers_launcher_and_survives_a_driver_kill(root, tmp_path):
    """The default launcher: a running job's ``log.txt`` grows line by line before the job ends, and keeps every
    line printed when the driver is killed (its worker dies with it, ``PR_SET_PDEATHSIG``)."""
    import signal
    import time

    from launch import setup2
    from procs import start_forked

    common = ["--root", root, "--datasets", "PACS", "--cfgs", "rn50_ep30", "--seeds", "1", "--domains", "sketch",
              "--lambda2", "1", "--epochs", "20", "--shots", "2", "--output-root", str(tmp_path / "sweep"), "--",
              *TINY, "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "TRAIN.PRINT_FREQ", "1"]
    run_dir = setup2.plan(common, trainer="CRoFT")[1][0].output_dir
    log, done = os.path.join(run_dir, "log.txt"), os.path.join(run_dir, "done")
    pid, o, e = start_forked(lambda: setup2.main(common, trainer="CRoFT"), str(tmp_path))
    sizes, t0 = [], time.time()
    while len(sizes) < 4 and time.time() - t0 < 240 and not os.path.exists(done):
        size = os.path.getsize(log) if os.path.isfile(log) else 0
        if size > (sizes[-1] if sizes else 0):
            sizes.append(size)
        time.sleep(0.02)
    running = not os.path.exists(done)
    os.kill(pid, signal.SIGKILL)
    wait_forked(pid, o, e)
    assert running and len(sizes) == 4, sizes  # the log grew three times while the job ran
    time.sleep(1.0)
    settled = os.path.getsize(log)
    time.sleep(1.0)
    assert os.path.getsize(log) == settled >= sizes[-1]  # the worker died with the driver; its lines stay
    text = open(log, encoding="utf-8").read()
    assert text.endswith("\n") and "epoch [1/20] batch [1/" in text and not os.path.exists(done)


def test_rolling_checkpoints_are_synced_once_at_the_end(tmp_path, monkeypatch):
    """Every checkpoint write is atomic; ``model-best.pth.tar`` is fsync'd when written, the rolling checkpoint and
    its ``checkpoint`` pointer (rewritten every epoch) only by ``sync_checkpoint``, which training calls once at
    its end (``after_train``)."""
    from dassl.engine.trainer import SimpleTrainer
    from dassl.utils.torchtools import save_checkpoint, sync_checkpoint

    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
                        or real(fd))
    state = {"state_dict": {"w": torch.zeros(2)}, "epoch": 3}
    assert sync_checkpoint(str(tmp_path)) == []  # nothing saved yet
    save_checkpoint(state, str(tmp_path))
    assert synced == []
    save_checkpoint(state, str(tmp_path), is_best=True)
    assert len(synced) == 1 and synced[0].startswith(".tmp-")  # the best model's data, before its rename
    paths = sync_checkpoint(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["model.pth.tar-3", "checkpoint"] == synced[1:]
    import inspect

    assert "self.sync_checkpoints(self.output_dir)" in inspect.getsource(SimpleTrainer.after_train)
