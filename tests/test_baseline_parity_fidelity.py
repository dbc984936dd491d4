"""What the golden baseline fixture cannot show, checked on the tiny random CLIP (``docs/protocol.md``, Baselines):

* Tip-Adapter-F's zero-shot logits use the official constant 100 whatever CLIP's logit scale (the fixture's CLIP has
  scale 100, so there both agree); the named fix ``CLIP_LOGIT_SCALE True`` uses CLIP's scale and is listed as
  fixed in the run record's protocol block; ``AUGMENT_EPOCH`` (undeclared officially) defaults to 10;
* under ``PREC fp16``/``bf16`` (the CPU fallback switched off) CoOp, CoCoOp and Tip-Adapter-F run their encoders in
  half precision but compute the logits from fp32 features; CoCoOp's meta-net takes CLIP's dtype as officially
  (``FP32_PARAMS True``: fp32).
"""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import baseline_golden as bg
from helpers import COOP, cli_args
from synthetic import write_lodo_tree

CONFIGS = {"CoOp": "CoOp/rn50_ep30.yaml", "CoCoOp": "CoCoOp/rn50_ep30.yaml",
           "TIP_ADAPTER": "TIP_ADAPTER/rn50_ep30.yaml"}
NODES = {"CoOp": "COOP", "CoCoOp": "COCOOP", "TIP_ADAPTER": "TIP_ADAPTER"}
TIP_FAST = ["TRAINER.TIP_ADAPTER.AUGMENT_EPOCH", "1", "TRAINER.TIP_ADAPTER.CACHE_MODE", "fixed",
            "DATASET.NUM_SHOTS", "2", "DATASET.FEWSHOT_SAMPLER", "per_class_domain"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_lodo_tree(root, per_class=4)
    return root


def build(root: str, out: Any, name: str, extra: list[str] = ()) -> Any:
    import train
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed

    fast = ["OPTIM.WARMUP_EPOCH", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8"]
    fast += TIP_FAST if name == "TIP_ADAPTER" else []
    args = cli_args(root, str(out), name, config=os.path.join(COOP, "configs", "trainers", CONFIGS[name]),
                    dataset_cfg=os.path.join(COOP, "configs/datasets/PACS.yaml"), extra=fast + list(extra))
    cfg = train.setup_cfg(train.get_parser().parse_args(args))
    set_random_seed(cfg.SEED)
    return build_trainer(cfg)


def tip_parts(tr: Any) -> tuple[torch.Tensor, tuple]:
    """The normalised features and ``logit_parts`` outputs of one inference batch."""
    images = next(iter(tr.test_loader))["img"]
    with bg.Recorder() as rec:
        rec.method("features", tr, "forward_features")
        rec.method("parts", tr, "logit_parts")
        out = bg.evaluate(tr, images)
        (_, x), = rec.take("features")
        parts, = rec.take("parts")
    torch.testing.assert_close(out.logits, parts[0], rtol=0, atol=0)
    return x, parts


@pytest.mark.parametrize("clip_scale", [False, True])
def test_tip_zero_shot_scale(clip_scale, data_root, tmp_path):
    from dassl.config import cfg_to_dict
    from dassl.engine.protocol import protocol_block

    tr = build(data_root, tmp_path, "TIP_ADAPTER", ["TRAINER.TIP_ADAPTER.CLIP_LOGIT_SCALE", str(clip_scale)])
    assert abs(tr.logit_scale - 100.0) > 1.0  # the random CLIP's scale is not 100, so the two can be told apart
    x, (_, clip, _) = tip_parts(tr)
    scale = tr.logit_scale if clip_scale else 100.0
    torch.testing.assert_close(clip, scale * x @ tr.clip_weights.t(), rtol=0, atol=0)
    fixed = protocol_block(cfg_to_dict(tr.cfg))["fixed"]
    assert ("TRAINER.TIP_ADAPTER.CLIP_LOGIT_SCALE" in fixed) == clip_scale


def test_tip_augment_epoch_defaults_to_ten():
    import train
    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    train.extend_cfg(cfg)
    cfg.merge_from_file(os.path.join(COOP, "configs", "trainers", CONFIGS["TIP_ADAPTER"]))
    assert cfg.TRAINER.TIP_ADAPTER.AUGMENT_EPOCH == 10  # literal-ok: the documented default


def _prompt_logits_from(tr: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(normalised image features, text features, logits)`` seen by one inference batch of CoOp / CoCoOp."""
    images = next(iter(tr.test_loader))["img"]
    text_method = "text_features" if name == "CoOp" else "per_image_text_features"
    with bg.Recorder() as rec:
        rec.method("logits", tr, "forward_logits")
        rec.method("image", tr, "image_features")
        rec.method("text", tr, text_method)
        out = bg.evaluate(tr, images)
        (feats, _), = rec.take("image")
        text, = rec.take("text")
        logits, = rec.take("logits")
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
    return feats, text, logits


@pytest.mark.parametrize("prec", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["CoOp", "CoCoOp", "TIP_ADAPTER"])
def test_half_encoders_fp32_logits(name, prec, data_root, tmp_path, monkeypatch):
    """PREC fp16/bf16 on the GPU path: encoders in half precision, logits from fp32 image and text features."""
    from dassl.engine.trainer import SimpleTrainer

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[prec]
    monkeypatch.setattr(SimpleTrainer, "resolve_precision", lambda self, p: p)
    tr = build(data_root, tmp_path, name, [f"TRAINER.{NODES[name]}.PREC", prec])
    assert tr.prec == prec and next(tr.image_encoder.parameters()).dtype == half
    if name == "TIP_ADAPTER":
        x, (logits, clip, cache) = tip_parts(tr)
        assert x.dtype == tr.clip_weights.dtype == tr.adapter.weight.dtype == logits.dtype == torch.float32
        torch.testing.assert_close(clip, 100.0 * x @ tr.clip_weights.t(), rtol=0, atol=0)
        return
    assert tr.clip_model.token_embedding.weight.dtype == half
    feats, text, logits = _prompt_logits_from(tr, name)
    assert feats.dtype == text.dtype == logits.dtype == torch.float32
    expected = (tr.logit_scale * feats @ text.t() if name == "CoOp"
                else tr.logit_scale * torch.einsum("nd,ncd->nc", feats, text))
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("fp32_params", [False, True])
def test_cocoop_meta_net_takes_clips_dtype_unless_fp32_params(fp32_params, data_root, tmp_path, monkeypatch):
    """Under PREC fp16 the context and the meta-net are fp16 as officially; FP32_PARAMS True keeps both fp32."""
    from dassl.engine.trainer import SimpleTrainer

    monkeypatch.setattr(SimpleTrainer, "resolve_precision", lambda self, p: p)
    tr = build(data_root, tmp_path, "CoCoOp", ["TRAINER.COCOOP.PREC", "fp16",
                                                "TRAINER.COCOOP.FP32_PARAMS", str(fp32_params)])
    want = torch.float32 if fp32_params else torch.float16
    pl = tr.prompt_learner
    assert pl.ctx.dtype == want and {p.dtype for p in pl.meta_net.parameters()} == {want}
