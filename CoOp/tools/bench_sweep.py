"""Benchmark: one CRoFT lambda2 sweep on DigitsDG-mini, the official way and this project's way, timed.

* official: a ``python train.py`` process per run, no feature cache (a fresh augmentation of every image every
  epoch), training runs then one evaluation run per (model, open-set folder) (``--launcher process --jobs 1``,
  ``--eval-per-ood``);
* project: persistent workers (``--launcher workers --jobs N``), the feature cache (``FEATURE_CACHE.ENABLED``,
  filled inside the timed flow from an empty folder) and one evaluation pass per trained model over all open-set
  folders (``train.py --eval-open-set``, the drivers' default);
* project with ``--stack``: the same, with the λ-sweep's training runs trained as one vectorised run.

Both flows make the same runs (``launch.setup2``; the same run directories and records): 5 lambda2 values, one
held-out domain, one seed, then evaluation against each open-set folder. ``runs`` counts run directories,
``jobs`` the ``train.py`` invocations that made them. Printed: image-encoder passes (summed from the run records), train and
evaluation wall time, their ratios; evaluation throughput inside a run against a bare decode + ``encode_image``
loop over the same images (best of 3, interleaved); one CRoFT training step of 5 λ runs, separate vs stacked,
at feature widths 64 / 512 / 1024; the start-up (imports) of a fresh ``train.py`` process. With ``--device cuda``: ViT-B/16 (random weights) extraction images/s in fp32
and bf16, the fraction of the device's measured matmul peak, and the stacked-step comparison on the device.

    python tools/bench_sweep.py [--cache .cache] [--jobs 2] [--epochs 30] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, Optional, Sequence

COOP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(COOP_DIR)
if COOP_DIR not in sys.path:
    sys.path.insert(0, COOP_DIR)

LAMBDA2 = [1000.0, 100.0, 10.0, 1.0, 0.0]
REPEATS = 3  # evaluation-throughput timings: best of this many, interleaved


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=os.path.join(REPO_DIR, ".cache"), help="data + tiny CLIP (built if absent)")
    p.add_argument("--work", default="", help="run folders (default: <cache>/bench; emptied first)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lambda2", nargs="+", type=float, default=LAMBDA2)
    p.add_argument("--domain", default="mnist", help="held-out domain")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ood", nargs="+", default=["FashionMNIST", "Textures"])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="workers of the project's flow")
    p.add_argument("--per-class", type=int, help="DigitsDG-mini images per domain and class (builder default)")
    p.add_argument("--pretrain-steps", type=int, help="tiny-CLIP pretraining steps (default: the demo's)")
    p.add_argument("--weights", default="", help="an existing tinyclip-rn32 weights file (skips the pretraining; "
                   "timings do not depend on how well it is trained)")
    p.add_argument("--skip-official", action="store_true", help="only the project's flow")
    p.add_argument("--skip-stack", action="store_true", help="no flow with the λ-sweep trained as one stack")
    p.add_argument("--skip-eval-throughput", action="store_true", help="no ZS-CLIP throughput comparison")
    p.add_argument("--device", default="cpu", help="cpu (the sweeps), or cuda[:N] (only the ViT-B/16 extraction "
                   "benchmark: images/s in fp32 and bf16, fraction of the measured matmul peak)")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    return p


def ensure_assets(cache: str, per_class: Optional[int], steps: Optional[int], weights: str = "") -> tuple[str, str]:
    """(data root, tiny-CLIP weights): DigitsDG-mini + open-set folders and the pretrained tinyclip-rn32, built
    (or reused) by the demo's own steps."""
    from demo.run import ensure_backbone, ensure_data

    data_root = os.path.join(cache, "data")
    ensure_data(data_root, per_class)
    if weights:
        if not os.path.isfile(weights):
            raise SystemExit(f"error: --weights {weights}: no such file (a tinyclip-rn32 state dict belongs there)")
        return data_root, os.path.abspath(weights)
    return data_root, ensure_backbone(cache, data_root, steps)[0]


def plan(args: argparse.Namespace, data_root: str, weights: str, work: str, cached: bool,
         one_pass: bool = True) -> tuple[list, list]:
    """(training jobs, evaluation jobs) of a flow; ``one_pass`` False: one evaluation job per open-set folder."""
    from launch import setup2

    argv = ["--root", data_root, "--trainer", "CRoFT", "--datasets", "DigitsDG", "--cfgs", "demo_digits",
            "--domains", args.domain, "--seeds", str(args.seed), "--shots", "16", "--weights", weights,
            "--lambda1", "15", "--lambda2", *map(str, args.lambda2), "--ratios", "0.2,0.5", "--gen-step", "1",
            "--epochs", str(args.epochs),
            "--output-root", os.path.join(work, "output"), "--eval-root", os.path.join(work, "eval"),
            "--ood", *args.ood, "--device", "cpu", *([] if one_pass else ["--eval-per-ood"]), "--",
            "FEATURE_CACHE.ENABLED", str(cached), "FEATURE_CACHE.DIR", os.path.join(work, "features")]
    return setup2.plan(argv)[1], setup2.plan(argv, evaluate=True)[1]


def encoder_images(jobs: list) -> int:
    """Image-encoder passes summed over the records of every run the jobs made."""
    total = 0
    for run_dir in (d for job in jobs for d in job.run_dirs()):
        with open(os.path.join(run_dir, "record.json"), encoding="utf-8") as f:
            total += int(json.load(f)["timings"].get("encoder_images", 0))
    return total


def run_flow(name: str, train: list, evals: list, launcher: str, jobs: int, stack: bool = False) -> dict[str, Any]:
    """Run the training then the evaluation jobs with one launcher; wall times and encoder passes. ``stack``:
    the λ-sweep's training runs as one vectorised job (``--stack``)."""
    from launch.launchers import LaunchOptions, make_launcher
    from launch.sweep import run_jobs, stack_jobs

    n_runs = sum(len(j.run_dirs()) for j in train + evals)  # run directories, however many jobs make them
    if stack:
        train = stack_jobs(train)

    runner = make_launcher(launcher, LaunchOptions(jobs=jobs))
    runner.keep_alive = True  # one pool for both phases (a no-op for launchers without a pool)
    try:
        t0 = time.time()
        failed = run_jobs(train, runner=runner)
        t1 = time.time()
        failed += run_jobs(evals, runner=runner)
        t2 = time.time()
    finally:
        runner.close()
    if failed:
        raise SystemExit(f"error: {failed} runs of the {name} flow failed (see the messages above)")
    return {"flow": name, "runs": n_runs, "jobs": len(train) + len(evals),
            "encoder_images": encoder_images(train + evals),
            "train_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2)}


def eval_throughput(data_root: str, weights: str, work: str, domain: str) -> dict[str, Any]:
    """A ZS-CLIP evaluation run (this process, as a worker runs it: no cache, memoised split lists and CLIP) vs a
    bare decode + encode_image loop on its images."""
    import io
    import contextlib

    import torch
    import train as train_py
    from torch.utils.data import DataLoader

    from dassl.data.data_manager import read_image

    out = os.path.join(work, "zs_eval")
    argv = ["--root", data_root, "--seed", "1", "--trainer", "ZeroshotCLIP", "--dataset-config-file",
            os.path.join(COOP_DIR, "configs", "datasets", "DigitsDG.yaml"), "--config-file",
            os.path.join(COOP_DIR, "configs", "trainers", "ZeroshotCLIP", "demo_digits.yaml"), "--output-dir", out,
            "--eval-only", "MODEL.BACKBONE.WEIGHTS", weights, "DEVICE", "cpu", "TEST_ENV",
            f"test_on_{domain}.json", "FEATURE_CACHE.ENABLED", "False"]
    with contextlib.redirect_stdout(io.StringIO()):
        train_py.main(argv)  # warm-up: imports, first touch of the files
        trainer = _trainer(argv)
    train_py.restore_stdout()
    items = trainer.dm.dataset.test
    tfm = trainer.dm.tfm_test
    enc = trainer.image_encoder

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int) -> torch.Tensor:
            return tfm(read_image(items[i].impath))

    def run() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            train_py.main(argv)
        train_py.restore_stdout()

    def loop() -> None:
        with torch.no_grad():
            for x in DataLoader(Images(), batch_size=trainer.cfg.DATALOADER.TEST.BATCH_SIZE, num_workers=0):
                enc(x)

    from dassl.utils import resources

    times: dict[str, list[float]] = {"run": [], "loop": []}
    resources.enable()  # as a job in a sweep worker: split lists and the CLIP build memoised per process
    try:
        run()  # fills the memo, as a worker's first job
        for _ in range(REPEATS):  # interleaved, best of REPEATS: load spikes of a shared machine hit both alike
            for name, fn in (("run", run), ("loop", loop)):
                t0 = time.time()
                fn()
                times[name].append(time.time() - t0)
    finally:
        resources.enable(False)
    in_run, bare = min(times["run"]), min(times["loop"])
    return {"images": len(items), "in_run_s": round(in_run, 3), "bare_loop_s": round(bare, 3),
            "ratio": round(in_run / bare, 2), "repeats": REPEATS}


def startup_seconds(repeats: int = 2) -> float:
    """Wall time of a fresh interpreter importing what a ``train.py`` run imports (train, every trainer and
    dataset module, open_clip), best of ``repeats``: what a process per run pays every time, a worker once."""
    import subprocess

    code = ("from launch.entry import train_module; train_module(); from dassl.utils.plugins import load_plugins; "
            "load_plugins('.'); import open_clip")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.time()
        subprocess.run([sys.executable, "-c", code], cwd=COOP_DIR, check=True)
        best = min(best, time.time() - t0)
    return round(best, 2)


def stack_steps(device: str, dims: Sequence[int] = (64, 512, 1024), k: int = 5, n: int = 32, classes: int = 7,
                reps: int = 5) -> list[dict[str, Any]]:
    """One CRoFT training step for ``k`` runs: ``k`` separate steps vs one stacked step (``--stack``), per
    feature width ``D`` (tiny CLIP 64, ViT-B/16 512, RN50 1024); batch ``n``, ``classes`` classes, SGD."""
    import torch

    from trainers.croft_core import Adapter, CRoFTOptions, OODImgGen, croft_train_step

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    out = []
    for dim in dims:
        X, T = torch.randn(n, dim, generator=gen).to(dev), torch.randn(classes, dim, generator=gen).to(dev)
        y = torch.randint(0, classes, (n,), generator=gen).to(dev)

        def make(stack: Optional[int]) -> tuple:
            a, g = Adapter(dim, device=dev, stack=stack), OODImgGen(dim, device=dev, stack=stack)
            return (a, g, torch.optim.SGD(a.parameters(), lr=2e-3, momentum=0.9),
                    torch.optim.SGD(g.parameters(), lr=2e-3, momentum=0.9))

        runs = [(make(None), CRoFTOptions(lambda1=15.0, lambda2=float(i))) for i in range(k)]
        stacked = (make(k), CRoFTOptions(lambda1=torch.full((k,), 15.0, device=dev),
                                         lambda2=torch.arange(k, dtype=torch.float32, device=dev)))
        timed = {}
        for name, group in (("separate", runs), ("stacked", [stacked])):
            for rep in range(reps + 1):  # the first is a warm-up
                if rep == 1:
                    _sync(dev)
                    t0 = time.time()
                for (a, g, oa, og), opts in group:
                    croft_train_step(a, g, X, T, y, oa, og, opts, 100.0)
            _sync(dev)
            timed[name] = (time.time() - t0) / reps
        out.append({"dim": dim, "runs": k, "separate_ms": round(1000 * timed["separate"], 2),
                    "stacked_ms": round(1000 * timed["stacked"], 2),
                    "speedup": round(timed["separate"] / timed["stacked"], 2)})
    return out


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _trainer(argv: list[str]) -> Any:
    import train as train_py
    from dassl.engine import build_trainer

    return build_trainer(train_py.setup_cfg(train_py.get_parser().parse_args(argv)))


def gpu_extraction(device: str, n: int = 512, batch: int = 128) -> dict[str, Any]:
    """ViT-B/16 (random weights) image-encoder throughput in fp32 and bf16, and the fraction of the measured
    dense-matmul peak (same dtype) it reaches; TF32 off."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clip_backbone import load_clip

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    visual = load_clip("ViT-B/16", "random").model.visual.to(device).eval()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device)}
    x = torch.randn(batch, 3, 224, 224, device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        visual(x[:1])
    flops_per_image = fc.get_total_flops()
    out["gflops_per_image"] = round(flops_per_image / 1e9, 2)
    for dtype in (torch.float32, torch.bfloat16):
        v = visual.to(dtype)
        xi = x.to(dtype)
        with torch.no_grad():
            v(xi)
            torch.cuda.synchronize()
            t0 = time.time()
            for _ in range(n // batch):
                v(xi)
            torch.cuda.synchronize()
        ips = (n // batch) * batch / (time.time() - t0)
        peak = _matmul_peak(device, dtype)
        key = "fp32" if dtype == torch.float32 else "bf16"
        out[key] = {"images_per_s": round(ips, 1), "tflops": round(ips * flops_per_image / 1e12, 1),
                    "matmul_peak_tflops": round(peak / 1e12, 1),
                    "fraction_of_peak": round(ips * flops_per_image / peak, 3)}
    return out


def _matmul_peak(device: str, dtype: Any, size: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * size ** 3 * reps / (time.time() - t0)


def report(flows: list[dict[str, Any]], ev: Optional[dict[str, Any]], gpu: Optional[dict[str, Any]],
           steps: Optional[list[dict[str, Any]]] = None, startup: Optional[float] = None) -> str:
    lines = ["| flow | runs | jobs | encoder passes | train s | eval s | total s | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    base = flows[0] if flows else {}
    for f in flows:
        ratio = f"{base['total_s'] / f['total_s']:.1f}x (train {base['train_s'] / f['train_s']:.1f}x, eval " \
                f"{base['eval_s'] / f['eval_s']:.1f}x)" if f is not base else "1x"
        lines.append(f"| {f['flow']} | {f['runs']} | {f.get('jobs', f['runs'])} | {f['encoder_images']:,} | {f['train_s']} | {f['eval_s']} | "
                     f"{f['total_s']} | {ratio} |")
    if ev:
        lines.append(f"\nevaluation throughput: ZS-CLIP on {ev['images']} images: {ev['in_run_s']} s inside a run "
                     f"vs {ev['bare_loop_s']} s for a bare decode + encode_image loop ({ev['ratio']}x; best of "
                     f"{ev['repeats']}, interleaved)")
    if gpu:
        lines.append(f"\nViT-B/16 extraction on {gpu['device']} ({gpu['gflops_per_image']} GFLOP/image):")
        for key in ("fp32", "bf16"):
            g = gpu[key]
            lines.append(f"  {key}: {g['images_per_s']} images/s, {g['tflops']} TFLOP/s = "
                         f"{100 * g['fraction_of_peak']:.0f}% of the measured matmul peak "
                         f"({g['matmul_peak_tflops']} TFLOP/s)")
    if startup is not None:
        lines.append(f"\nstart-up of a fresh train.py process (imports): {startup} s (best of 2)")
    if steps:
        lines.append("\none CRoFT step for 5 λ runs (batch 32, 7 classes): 5 separate steps vs one stacked step")
        for st in steps:
            lines.append(f"  D={st['dim']}: {st['separate_ms']} ms vs {st['stacked_ms']} ms ({st['speedup']}x)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    cache = os.path.abspath(args.cache)
    work = os.path.abspath(args.work or os.path.join(cache, "bench"))
    if args.device != "cpu":  # the accelerator mode: extraction throughput only
        gpu = gpu_extraction(args.device)
        steps = stack_steps(args.device)
        print(report([], None, gpu, steps))
        _dump(args.json, {"gpu": gpu, "stack_steps": steps})
        return 0
    data_root, weights = ensure_assets(cache, args.per_class, args.pretrain_steps, args.weights)
    shutil.rmtree(work, ignore_errors=True)
    load0 = os.getloadavg()[0]
    flows = []
    if not args.skip_official:
        train, evals = plan(args, data_root, weights, os.path.join(work, "official"), cached=False, one_pass=False)
        flows.append(run_flow("official: process per run, no cache", train, evals, "process", 1))
    train, evals = plan(args, data_root, weights, os.path.join(work, "project"), cached=True)
    flows.append(run_flow(f"project: {args.jobs} persistent workers + feature cache + one evaluation pass per model",
                          train, evals, "workers", args.jobs))
    if not args.skip_stack:
        train, evals = plan(args, data_root, weights, os.path.join(work, "stacked"), cached=True)
        flows.append(run_flow(f"project, --stack: {args.jobs} workers + feature cache + one vectorised λ-sweep",
                              train, evals, "workers", args.jobs, stack=True))
    ev = None if args.skip_eval_throughput else eval_throughput(data_root, weights, work, args.domain)
    steps = None if args.skip_stack else stack_steps("cpu")
    startup = startup_seconds()
    text = report(flows, ev, None, steps, startup)
    print(f"\n{os.cpu_count()} CPU cores, load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(text)
    _dump(args.json, {"flows": flows, "eval_throughput": ev, "stack_steps": steps, "startup_s": startup,
                      "cpus": os.cpu_count(), "load_avg": [load0, os.getloadavg()[0]]})
    return 0


def _dump(path: str, obj: dict[str, Any]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
