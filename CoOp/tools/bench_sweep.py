"""Benchmark: one CRoFT lambda2 sweep on DigitsDG-mini, the official way and this project's way, timed.

Every flow runs ``--jobs N`` jobs in parallel (default 1, the headline: one job each) with the same torch threads
per job (``--threads``, default: the cores divided by ``N``; ``OMP_NUM_THREADS`` of every process):

* official: a ``python train.py`` process per run (``N`` at a time), no feature cache (a fresh augmentation of every
  image every epoch), training runs then one evaluation run per (model, open-set folder) (``--eval-per-ood``);
* project: the driver command a user runs, ``python scripts/CRoFT/run_setup2.py ... --then-eval --jobs N``, in a
  fresh process: ``N`` persistent workers (started before the plan is resolved), the feature cache
  (``FEATURE_CACHE.ENABLED``, filled inside the timed flow from an empty folder), one evaluation pass per trained
  model over all open-set folders, training and evaluation in the same workers;
* project, two commands: the training driver, then the evaluation driver (``python -m launch.setup2 --eval``);
* project with ``--stack``: the one command, with the λ-sweep's training runs trained as one vectorised run.

All flows make the same runs (``launch.setup2``; the same run directories and records): 5 lambda2 values, one
held-out domain, one seed, then evaluation against each open-set folder. ``runs`` counts run directories,
``train.py calls`` the invocations that made them. Printed: image-encoder passes (summed from the run records),
train and evaluation wall time (a driver command's training part includes its start-up and planning), their
ratios, and where each flow's seconds go (process start-ups, planning, each phase's jobs; from the drivers'
``--timings`` files and the run records); evaluation throughput inside a run against a bare decode +
``encode_image`` loop over the same images (best of 3, interleaved); one CRoFT training step of 5 λ runs, separate
vs stacked, at feature widths 64 / 512 / 1024; the start-up (imports) of a fresh ``train.py`` process. With
``--device cuda``: ViT-B/16 (random weights) extraction images/s in fp32 and bf16, the fraction of the device's
measured matmul peak, and the stacked-step comparison on the device.

    python tools/bench_sweep.py [--cache .cache] [--jobs 1] [--threads T] [--epochs 30] [--device cuda]
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
    p.add_argument("--jobs", type=int, default=1, help="parallel jobs of every flow (processes of the official "
                   "flow, workers of the project's; the headline is one job each)")
    p.add_argument("--threads", type=int, help="torch threads per job in every flow (OMP_NUM_THREADS of every "
                   "process; default: the cores divided by --jobs, what the workers take)")
    p.add_argument("--per-class", type=int, help="DigitsDG-mini images per domain and class (builder default)")
    p.add_argument("--pretrain-steps", type=int, help="pretrain the tiny CLIP here with this many steps (default: "
                   "the demo's shipped weights)")
    p.add_argument("--weights", default="", help="an existing tinyclip-rn32 weights file (skips the pretraining; "
                   "timings do not depend on how well it is trained)")
    p.add_argument("--skip-official", action="store_true", help="only the project's flow")
    p.add_argument("--skip-stack", action="store_true", help="no flow with the λ-sweep trained as one stack")
    p.add_argument("--skip-two-commands", action="store_true",
                   help="no flow with training and evaluation as two driver commands")
    p.add_argument("--skip-eval-throughput", action="store_true", help="no ZS-CLIP throughput comparison")
    p.add_argument("--device", default="cpu", help="cpu (the sweeps), or cuda[:N] (only the ViT-B/16 extraction "
                   "benchmark: images/s in fp32 and bf16, fraction of the measured matmul peak)")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    return p


def ensure_assets(cache: str, per_class: Optional[int], steps: Optional[int], weights: str = "") -> tuple[str, str]:
    """(data root, tiny-CLIP weights): DigitsDG-mini + open-set folders and tinyclip-rn32 (the shipped weights, or
    pretrained with ``steps``), built (or reused) by the demo's own steps."""
    from demo.run import ensure_backbone, ensure_data

    data_root = os.path.join(cache, "data")
    ensure_data(data_root, per_class)
    if weights:
        if not os.path.isfile(weights):
            raise SystemExit(f"error: --weights {weights}: no such file (a tinyclip-rn32 state dict belongs there)")
        return data_root, os.path.abspath(weights)
    return data_root, ensure_backbone(cache, data_root, bool(steps), steps)[0]


def driver_flags(args: argparse.Namespace, data_root: str, weights: str, work: str, cached: bool,
                 one_pass: bool = True) -> tuple[list[str], list[str]]:
    """(driver flags, ``KEY VALUE`` overrides) of the benchmark's sweep (``launch.setup2``) in folder ``work``;
    ``one_pass`` False: one evaluation job per open-set folder (``--eval-per-ood``)."""
    flags = ["--root", data_root, "--trainer", "CRoFT", "--datasets", "DigitsDG", "--cfgs", "demo_digits",
             "--domains", args.domain, "--seeds", str(args.seed), "--shots", "16", "--weights", weights,
             "--lambda1", "15", "--lambda2", *map(str, args.lambda2), "--ratios", "0.2,0.5", "--gen-step", "1",
             "--epochs", str(args.epochs),
             "--output-root", os.path.join(work, "output"), "--eval-root", os.path.join(work, "eval"),
             "--ood", *args.ood, "--device", "cpu", *([] if one_pass else ["--eval-per-ood"])]
    return flags, ["FEATURE_CACHE.ENABLED", str(cached), "FEATURE_CACHE.DIR", os.path.join(work, "features")]


def plan(args: argparse.Namespace, data_root: str, weights: str, work: str, cached: bool,
         one_pass: bool = True) -> tuple[list, list]:
    """(training jobs, evaluation jobs) of a flow, as the drivers plan them."""
    from launch import setup2

    flags, opts = driver_flags(args, data_root, weights, work, cached, one_pass)
    argv = flags + ["--", *opts]
    return setup2.plan(argv)[1], setup2.plan(argv, evaluate=True)[1]


def run_records(jobs: list) -> list[dict[str, Any]]:
    """The records of every run the jobs made."""
    out = []
    for run_dir in (d for job in jobs for d in job.run_dirs()):
        with open(os.path.join(run_dir, "record.json"), encoding="utf-8") as f:
            out.append(json.load(f))
    return out


def encoder_images(jobs: list) -> int:
    """Image-encoder passes summed over the records of every run the jobs made."""
    return sum(int(r["timings"].get("encoder_images", 0)) for r in run_records(jobs))


def flow_row(name: str, jobs: int, train: list, evals: list, calls: int, train_s: float, eval_s: float,
             breakdown: list[tuple[str, float]]) -> dict[str, Any]:
    return {"flow": name, "jobs": jobs, "runs": sum(len(j.run_dirs()) for j in train + evals), "calls": calls,
            "encoder_images": encoder_images(train + evals), "train_s": round(train_s, 2),
            "eval_s": round(eval_s, 2), "total_s": round(train_s + eval_s, 2),
            "breakdown": [(what, round(s, 2)) for what, s in breakdown]}


def run_official(args: argparse.Namespace, data_root: str, weights: str, work: str, startup: float) -> dict[str, Any]:
    """The official flow: a ``python train.py`` process per run (``--jobs`` at a time), no cache, training runs
    then one evaluation run per (model, open-set folder)."""
    from launch.launchers import LaunchOptions, make_launcher
    from launch.sweep import run_jobs

    train, evals = plan(args, data_root, weights, work, cached=False, one_pass=False)
    runner = make_launcher("process", LaunchOptions(jobs=args.jobs))
    t0 = time.time()
    failed = run_jobs(train, runner=runner)
    t1 = time.time()
    failed += run_jobs(evals, runner=runner)
    t2 = time.time()
    if failed:
        raise SystemExit(f"error: {failed} runs of the official flow failed (see the messages above)")
    return flow_row("official: process per run, no cache", args.jobs, train, evals, len(train) + len(evals),
                    t1 - t0, t2 - t1, official_breakdown(runner.job_times, run_records(train), run_records(evals),
                                                         startup))


def official_breakdown(job_times: list[dict[str, Any]], train_recs: list[dict[str, Any]],
                       eval_recs: list[dict[str, Any]], startup: float) -> list[tuple[str, float]]:
    """Where the official flow's process-seconds go: each process's imports (``startup``, measured alone), the
    rest of its start-up (config, data lists, CLIP, trainer) and record outside the run's own ``run_seconds``,
    then the runs themselves."""
    wall = sum(j["ended"] - j["sent"] for j in job_times)
    runs = {k: sum(r["timings"]["run_seconds"] for r in recs) for k, recs in (("train", train_recs),
                                                                               ("eval", eval_recs))}
    imports = startup * len(job_times)
    return [(f"{len(job_times)} process start-ups: imports ({startup} s each, measured alone)", imports),
            ("the rest of each process's start-up (config, data lists, CLIP, trainer) and its record",
             wall - imports - runs["train"] - runs["eval"]),
            (f"{len(train_recs)} training runs (their run_seconds)", runs["train"]),
            (f"{len(eval_recs)} evaluation runs (their run_seconds)", runs["eval"])]


def run_driver(name: str, commands: list[list[str]], train: list, evals: list, jobs: int,
               log: str) -> dict[str, Any]:
    """A project flow: driver commands run as a user runs them (fresh ``python`` processes, cwd ``CoOp/``), each
    with ``--timings``; train seconds run from the first command's start to the end of its training phase."""
    import subprocess

    spans, timings = [], []
    env = dict(os.environ, CROFT_NO_PROGRESS="1")
    for i, cmd in enumerate(commands):
        path = f"{log}.{i}.timings.json"
        with open(f"{log}.{i}.txt", "w", encoding="utf-8") as out:
            t0 = time.time()
            cut = cmd.index("--")
            res = subprocess.run([sys.executable, *cmd[:cut], "--timings", path, *cmd[cut:]], cwd=COOP_DIR, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
            t1 = time.time()
        if res.returncode != 0:
            raise SystemExit(f"error: the {name} flow's command {i + 1} failed (exit code {res.returncode}; "
                             f"see {log}.{i}.txt)")
        with open(path, encoding="utf-8") as f:
            timings.append(json.load(f))
        spans.append((t0, t1))
    train_end = timings[0]["phases"][0]["end"] if len(commands) == 1 else spans[0][1]
    train_s, total = train_end - spans[0][0], sum(t1 - t0 for t0, t1 in spans)
    return flow_row(name, jobs, train, evals, sum(len(p["jobs"]) for t in timings for p in t["phases"]), train_s,
                    total - train_s, driver_breakdown(spans, timings))


def driver_breakdown(spans: list[tuple[float, float]], timings: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Where driver commands' seconds go, from their ``--timings`` files and wall spans ``(start, end)``: the
    interpreter and the driver's imports, planning (the workers import meanwhile), jobs waiting for a worker to
    start, the jobs of each phase (the first training job fills the feature cache) and the rest (between jobs,
    stopping the workers). Job times are job-seconds (they overlap with several parallel jobs)."""
    total = sum(t1 - t0 for t0, t1 in spans)
    parts: dict[str, float] = {"imports": 0.0, "planning": 0.0, "waiting": 0.0, "first": 0.0, "train": 0.0,
                               "eval": 0.0}
    counts = {"train": 0, "eval": 0}
    for (t0, _), t in zip(spans, timings):
        parts["imports"] += t["started"] - t0
        parts["planning"] += t["planned"] - t["started"]
        for p in t["phases"]:
            for k, j in enumerate(p["jobs"]):
                parts["waiting"] += max(0.0, j["began"] - j["sent"])
                key = "first" if p["phase"] == "train" and k == 0 and counts["train"] == 0 else p["phase"]
                parts[key] += j["ended"] - j["began"]
                counts[p["phase"]] += 1
    rest = total - sum(parts.values())
    return [(f"{len(spans)} interpreter start-up(s) and the driver's imports", parts["imports"]),
            ("planning: every run's fingerprint (the workers start and import meanwhile)", parts["planning"]),
            ("jobs waiting for a worker to finish starting", parts["waiting"]),
            ("first training job (fills the feature cache)", parts["first"]),
            (f"the other {max(0, counts['train'] - 1)} training jobs", parts["train"]),
            (f"{counts['eval']} evaluation jobs", parts["eval"]),
            ("the rest: handing out jobs, stopping the workers", rest)]


def project_commands(args: argparse.Namespace, data_root: str, weights: str, work: str, then_eval: bool = True,
                     stack: bool = False) -> list[list[str]]:
    """The project's driver command(s) for the sweep: ``run_setup2.py ... --then-eval`` (one command), or the
    training driver then the evaluation driver (``python -m launch.setup2 --eval``)."""
    flags, opts = driver_flags(args, data_root, weights, work, cached=True)
    common = [*flags, "--jobs", str(args.jobs), *(["--stack"] if stack else [])]
    train = [os.path.join("scripts", "CRoFT", "run_setup2.py"), *common]
    if then_eval:
        return [[*train, "--then-eval", "--", *opts]]
    return [[*train, "--", *opts], ["-m", "launch.setup2", "--eval", *flags, "--jobs", str(args.jobs), "--", *opts]]


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
    """The table (``jobs``: parallel jobs of each flow; speed-ups against the first flow), where each flow's
    seconds go, then the throughput, start-up and stacked-step lines."""
    lines = ["| flow | jobs | runs | train.py calls | encoder passes | train s | eval s | total s | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = flows[0] if flows else {}
    for f in flows:
        ratio = f"{base['total_s'] / f['total_s']:.1f}x (train {base['train_s'] / f['train_s']:.1f}x, eval " \
                f"{base['eval_s'] / f['eval_s']:.1f}x)" if f is not base else "1x"
        lines.append(f"| {f['flow']} | {f['jobs']} | {f['runs']} | {f['calls']} | {f['encoder_images']:,} | "
                     f"{f['train_s']} | {f['eval_s']} | {f['total_s']} | {ratio} |")
    if flows:
        lines.append("\nwhere the seconds go (job times are job-seconds):")
        for f in flows:
            lines.append(f"  {f['flow']} ({f['total_s']} s):")
            lines.extend(f"    {s:7.2f} s  {what}" for what, s in f["breakdown"])
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


def machine() -> str:
    """CPU model and core count (Linux: /proc/cpuinfo)."""
    model = ""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return f"{os.cpu_count()} CPU cores" + (f" ({model})" if model else "")


def set_threads(threads: int) -> int:
    """Torch threads per job, the same in every flow: ``OMP_NUM_THREADS`` for the processes started from here (the
    official flow's ``train.py`` processes; the drivers' workers honour it as a cap) and this process's threads."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def run_flows(args: argparse.Namespace, data_root: str, weights: str, work: str,
              startup: float) -> list[dict[str, Any]]:
    """The official flow and the project's flows, ``--jobs`` parallel jobs each, in this order."""
    flows = []
    if not args.skip_official:
        flows.append(run_official(args, data_root, weights, os.path.join(work, "official"), startup))
    variants = [("project", True, False, "one command (--then-eval)")]
    if not args.skip_two_commands:
        variants.append(("two", False, False, "two commands (training driver, then evaluation driver)"))
    if not args.skip_stack:
        variants.append(("stacked", True, True, "--stack, one command (--then-eval): one vectorised λ-sweep"))
    for folder, then_eval, stack, what in variants:
        sub = os.path.join(work, folder)
        train, evals = plan(args, data_root, weights, sub, cached=True)
        cmds = project_commands(args, data_root, weights, sub, then_eval, stack)
        name = f"project: workers + feature cache + one evaluation pass per model, {what}"
        flows.append(run_driver(name, cmds, train, evals, args.jobs, os.path.join(work, f"{folder}-driver")))
    return flows


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
    args.threads = set_threads(args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    load0 = os.getloadavg()[0]
    startup = startup_seconds()
    flows = run_flows(args, data_root, weights, work, startup)
    load1 = os.getloadavg()[0]
    ev = None if args.skip_eval_throughput else eval_throughput(data_root, weights, work, args.domain)
    steps = None if args.skip_stack else stack_steps("cpu")
    text = report(flows, ev, None, steps, startup)
    print(f"\n{machine()}, load average {load0:.1f} at the start of the flows, {load1:.1f} at their end; every "
          f"flow {args.jobs} job(s) in parallel, {args.threads} torch thread(s) per job")
    print(text)
    _dump(args.json, {"flows": flows, "eval_throughput": ev, "stack_steps": steps, "startup_s": startup,
                      "machine": machine(), "cpus": os.cpu_count(), "load_avg": [load0, load1],
                      "jobs": args.jobs, "threads": args.threads})
    return 0


def _dump(path: str, obj: dict[str, Any]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
