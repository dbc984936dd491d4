"""Check the accelerator path against the CPU: a few CRoFT and CoOp steps on a random-initialised CLIP.

    python tools/gpu_check.py --device cuda --backbone ViT-B/16 [--steps 5] [--batch 32] [--out result.json]

For fp32 and bf16 (autocast) on the device it reports: image features vs the CPU fp32 run (norm-wise relative
error), the CRoFT adapter/generator weights after ``--steps`` training steps vs CPU, CoOp text features and one
prompt-learner step vs CPU, and encoder throughput (images/s). TF32 is switched off so fp32 is comparable.
Runs anywhere (``--device cpu`` compares the CPU with itself, a smoke test).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

COOP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, COOP_DIR)

from clip_backbone import TextEncoder, load_clip, tokenize  # noqa: E402
from trainers.croft_core import Adapter, CRoFTOptions, OODImgGen, croft_train_step  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run(device: str, dtype: torch.dtype, args: argparse.Namespace, images: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = load_clip(args.backbone, "random").model.to(device).eval()
    dev = torch.device(device)
    amp = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), amp:
        feats = model.encode_image(images.to(device)).float()
        t0 = time.time()
        for _ in range(args.repeat):
            model.encode_image(images.to(device))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ips = args.repeat * len(images) / (time.time() - t0)
    # CRoFT: a few training steps on the encoded features (the adapters always run in fp32)
    n_cls = 5
    text = torch.randn(n_cls, feats.shape[1], generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.arange(len(images)).remainder(n_cls).to(device)
    adapter, gen = Adapter(feats.shape[1]).to(device), OODImgGen(feats.shape[1]).to(device)
    opt_a = torch.optim.SGD(adapter.parameters(), lr=0.002, momentum=0.9, weight_decay=0.1)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.002, momentum=0.9, weight_decay=0.1)
    opts = CRoFTOptions(ratio=0.2, ratio_text=0.5, lambda1=5.0, lambda2=5.0, gen_step=1, wccf=True, edr_branch="A",
                        edr_reduction="sum_meansq")
    for _ in range(args.steps):
        croft_train_step(adapter, gen, feats, text, labels, opt_a, opt_g, opts, 100.0)
    # CoOp: prompt "X X X X {class}." through the text transformer, one SGD step on the context
    ctx_len = 4
    prompts = [" ".join(["X"] * ctx_len) + f" class{i}." for i in range(n_cls)]
    tokens = tokenize(prompts, int(model.positional_embedding.shape[0])).to(device)
    emb = model.token_embedding(tokens).detach()
    ctx = torch.nn.Parameter(torch.randn(ctx_len, emb.shape[-1], generator=torch.Generator().manual_seed(2)).to(device)
                             * 0.02)
    encoder = TextEncoder(model)
    opt_c = torch.optim.SGD([ctx], lr=0.002, momentum=0.9)
    with amp:
        prompt_emb = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(n_cls, -1, -1), emb[:, 1 + ctx_len:]], dim=1)
        tf = encoder(prompt_emb, tokens).float()
        logits = 100 * torch.nn.functional.normalize(feats, dim=-1) @ torch.nn.functional.normalize(tf, dim=-1).t()
        loss = torch.nn.functional.cross_entropy(logits, labels)
    opt_c.zero_grad()
    loss.backward()
    opt_c.step()
    return {"feats": feats, "fc_i": adapter.fc_i, "fc_t": adapter.fc_t, "img2img_cov": gen.img2img_cov,
            "coop_text": tf, "coop_ctx": ctx, "images_per_s": ips}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbone", default="ViT-B/16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3, help="encoder passes timed for images/s")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    ref = run("cpu", torch.float32, args, images)
    report = {"device": args.device, "backbone": args.backbone, "batch": args.batch, "steps": args.steps,
              "cpu_images_per_s": round(ref["images_per_s"], 1)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        got = run(args.device, dtype, args, images)
        report[name] = {k: rel(got[k], ref[k]) for k in ("feats", "fc_i", "fc_t", "img2img_cov", "coop_text",
                                                           "coop_ctx")}
        report[name]["images_per_s"] = round(got["images_per_s"], 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    ok = all(v < 1e-3 for k, v in report["fp32"].items() if k != "images_per_s")
    print("fp32 matches the CPU run" if ok else "WARNING: fp32 differs from the CPU run by more than 1e-3")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
