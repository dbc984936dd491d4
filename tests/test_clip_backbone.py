"""CLIP backbone loading: names, local weight formats, clear errors, never a download or a silent random model."""
from __future__ import annotations

import os

import pytest
import torch


def _tiny_state(name="tiny-rn-test"):
    from clip_backbone import load_clip

    torch.manual_seed(0)
    return load_clip(name, "random").model.state_dict()


@pytest.mark.parametrize("fmt", ["plain", "checkpoint_module_prefix", "pickled_module"])
def test_local_weight_formats_load_exactly(tmp_path, fmt):
    from clip_backbone import load_clip

    sd = _tiny_state()
    path = tmp_path / "w.pt"
    if fmt == "plain":
        torch.save(sd, path)
    elif fmt == "checkpoint_module_prefix":  # open_clip training checkpoints (DDP prefixes)
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        from clip_backbone.loader import _build_custom

        model, _, _ = _build_custom("tiny-rn-test", None)
        model.load_state_dict(sd)
        torch.save(model, path)
    if fmt == "pickled_module":  # a pickled module is code: refused, nothing of it built
        from clip_backbone.loader import WeightsError

        with pytest.raises(WeightsError, match=r"refusing to unpickle CLIP weights .*tools/data_only\.py"):
            load_clip("tiny-rn-test", str(path))
        return
    bundle = load_clip("tiny-rn-test", str(path))
    for k, v in bundle.model.state_dict().items():
        assert torch.equal(v, sd[k].float()), k
    assert bundle.weights == str(path) and bundle.context_length == 32


def test_torchscript_archive_is_read(tmp_path):
    from clip_backbone.loader import _read_state_dict

    lin = torch.nn.Linear(3, 2)
    torch.jit.save(torch.jit.script(lin), str(tmp_path / "ts.pt"))
    sd = _read_state_dict(str(tmp_path / "ts.pt"))
    assert torch.equal(sd["weight"], lin.weight.detach())


def test_errors_name_the_path(tmp_path, monkeypatch):
    from clip_backbone import default_weights_path, load_clip
    from dassl.utils.errors import ConfigError, WeightsError

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="ViT-B-16.pt") as err:
        load_clip("ViT-B/16")
    assert str(tmp_path) in str(err.value) and "nothing is downloaded" in str(err.value)
    assert default_weights_path("ViT-B-16") == os.path.join(str(tmp_path), ".cache", "clip", "ViT-B-16.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"visual.nonsense": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="does not match"):
        load_clip("tiny-rn-test", str(bad))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot read"):
        load_clip("tiny-rn-test", str(tmp_path / "junk.pt"))
    with pytest.raises(ConfigError, match="did you mean 'ViT-B/16'"):
        load_clip("ViT-B/61")


def test_text_encoder_matches_encode_text():
    from clip_backbone import TextEncoder, load_clip, tokenize

    bundle = load_clip("tiny-vit-test", "random")
    tokens = tokenize(["a photo of a dog.", "a photo of a house."], bundle.context_length)
    te = TextEncoder(bundle.model)
    with torch.no_grad():
        got = te(bundle.model.token_embedding(tokens), tokens)
        ref = bundle.model.encode_text(tokens)
    torch.testing.assert_close(got, ref)


@pytest.mark.slow
def test_openai_layout_rn50_round_trip(tmp_path):
    """A full-size OpenAI-layout RN50 state dict loads with QuickGELU (slow: ~100M parameters)."""
    import open_clip

    from clip_backbone import load_clip

    ref = open_clip.create_model("RN50-quickgelu", pretrained=None)
    torch.save(ref.state_dict(), tmp_path / "RN50.pt")
    bundle = load_clip("RN50", str(tmp_path / "RN50.pt"))
    assert bundle.quick_gelu and bundle.embed_dim == 1024
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.encode_image(x), ref.eval().encode_image(x))
