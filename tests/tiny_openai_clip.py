"""Tiny CLIPs in OpenAI's checkpoint layout (what ``clip.build_model`` reads), random but seeded.

Shapes follow OpenAI's conventions so the architecture can be read back off the state dict: text width 64
(1 head = width // 64), context length 77, full BPE vocabulary; RN: stem width 8 (4 attention-pool heads),
input 32 px; ViT: width 64, patch 16, input 32 px.
"""
from __future__ import annotations

import torch


def tiny_openai_state_dict(kind: str = "rn", seed: int = 0) -> dict[str, torch.Tensor]:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    if kind == "rn":
        vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=32)
    else:
        vision = CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = CLIP(32, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    with torch.no_grad():  # break the zero-init of the final projections so features are informative
        for p in model.parameters():
            if p.dim() >= 2 and float(p.abs().sum()) == 0.0:
                p.normal_(std=0.02)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

