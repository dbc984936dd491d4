"""Official precision defaults (PREC fp16 on CUDA) and what the run record says on CPU."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import COOP, cli_args, run_cli
from synthetic import write_lodo_tree

OFFICIAL_FP16 = {"ZeroshotCLIP": "ZSCLIP", "CoOp": "COOP", "CoCoOp": "COCOOP", "DPLCLIP": "DPLCLIP", "BCAL": "BCAL",
                 "TIP_ADAPTER": "TIP_ADAPTER"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_lodo_tree(root, per_class=2)
    return root


def build(root, out, name, extra=()):
    import train
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed

    args = cli_args(root, str(out), name, config=os.path.join(COOP, f"configs/trainers/{name}/rn50_ep30.yaml"),
                    extra=list(extra), dataset_cfg=os.path.join(COOP, "configs/datasets/PACS.yaml"))
    cfg = train.setup_cfg(train.get_parser().parse_args(args))
    set_random_seed(cfg.SEED)
    return build_trainer(cfg)


def test_official_defaults_are_fp16():
    import train
    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    train.extend_cfg(cfg)
    for node in OFFICIAL_FP16.values():
        assert cfg.TRAINER[node].PREC == "fp16", node
    for node in ("COOP", "COCOOP", "DPLCLIP", "BCAL"):
        assert cfg.TRAINER[node].FP32_PARAMS is False, node


def test_zsclip_record_says_requested_and_used_on_cpu(data_root, tmp_path):
    rec = run_cli(cli_args(data_root, str(tmp_path / "zs"), "ZeroshotCLIP",
                           config="configs/trainers/ZeroshotCLIP/rn50_ep30.yaml", flags=["--eval-only"]))
    assert rec["precision"] == {"requested": "fp16", "used": "fp32", "device": "cpu"}
    rec = run_cli(cli_args(data_root, str(tmp_path / "zs32"), "ZeroshotCLIP",
                           config="configs/trainers/ZeroshotCLIP/rn50_ep30.yaml", flags=["--eval-only"],
                           extra=["TRAINER.ZSCLIP.PREC", "fp32"]))
    assert rec["precision"]["requested"] == rec["precision"]["used"] == "fp32"


def test_zsclip_fp16_path_forced_on_cpu(data_root, tmp_path, monkeypatch):
    """With the CPU fallback off, ZS-CLIP runs the whole CLIP in fp16 and returns fp32 outputs close to fp32's."""
    from dassl.engine.trainer import SimpleTrainer

    ref = build(data_root, tmp_path / "a", "ZeroshotCLIP")
    batch = next(iter(ref.test_loader))
    with torch.no_grad():
        want = ref.model_inference(batch["img"])
    monkeypatch.setattr(SimpleTrainer, "resolve_precision", lambda self, p: p)
    tr = build(data_root, tmp_path / "b", "ZeroshotCLIP")
    assert tr.prec == "fp16" and all(p.dtype == torch.float16 for p in tr.clip_model.parameters())
    with torch.no_grad():
        got = tr.model_inference(batch["img"])
    for g in (got.logits, got.features, got.score):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
    torch.testing.assert_close(got.features, want.features, rtol=0, atol=2e-2)
    assert not torch.equal(got.logits, want.logits)   # really computed in half precision
