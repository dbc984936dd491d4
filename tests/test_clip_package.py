"""The ``clip`` package: OpenAI CLIP's API over open_clip, local files only."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from tiny_openai_clip import tiny_openai_state_dict


class CoOpStyleTextEncoder(nn.Module):
    """A CoOp-family TextEncoder, written against OpenAI's model layout (sequence-first transformer)."""

    def __init__(self, clip_model):
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts, tokenized_prompts):
        x = prompts + self.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)
        x = self.transformer(x)
        x = x.permute(1, 0, 2)
        x = self.ln_final(x).type(self.dtype)
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection


TEXTS = ["a photo of a dog.", "X X X X banded texture.", "itap of a origami crane."]


@pytest.mark.parametrize("kind", ["rn", "vit"])
def test_coop_text_encoder_equals_open_clip_encode_text(kind):
    import open_clip
    from open_clip.model import build_model_from_openai_state_dict

    from clip import clip

    sd = tiny_openai_state_dict(kind)
    model = clip.build_model(sd).float()
    reference = build_model_from_openai_state_dict(dict(sd), cast_dtype=None).float().eval()
    ref_tokens = open_clip.get_tokenizer("RN50")(TEXTS)
    tokens = clip.tokenize(TEXTS)
    assert torch.equal(tokens.long(), ref_tokens)
    with torch.no_grad():
        expected = reference.encode_text(ref_tokens)
        ours = model.encode_text(tokens)
        coop = CoOpStyleTextEncoder(model)(model.token_embedding(tokens).type(model.dtype), tokens)
    assert expected.abs().max() > 1e-3  # informative features
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(coop, expected, atol=1e-5, rtol=0)
    # the same CoOp encoder on open_clip's own (batch-first, external-mask) transformer is NOT equivalent
    with torch.no_grad():
        reference.dtype = torch.float32
        naive = CoOpStyleTextEncoder(reference)
        wrong = naive(reference.token_embedding(ref_tokens), ref_tokens)
    assert (wrong - expected).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["rn", "vit"])
def test_build_model_is_fp16_like_openai_and_float_works(kind):
    from clip import clip
    from clip.model import convert_weights

    sd = tiny_openai_state_dict(kind)
    before = {k: v.clone() for k, v in sd.items()}
    model = clip.build_model(sd)
    assert all(torch.equal(sd[k], before[k]) for k in before)  # caller's dict untouched
    assert model.dtype == torch.float16 and model.visual.conv1.weight.dtype == torch.float16
    assert model.text_projection.dtype == torch.float16
    assert model.token_embedding.weight.dtype == torch.float32 and model.logit_scale.dtype == torch.float32
    assert model.visual.input_resolution == 32 and model.visual.output_dim == 32
    assert hasattr(model.visual, "proj") == (kind == "vit")
    assert set(model.state_dict()) == set(sd)  # OpenAI's key layout
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        half = model.encode_image(image)                       # fp16 on CPU, as upstream ZS-CLIP runs it
        full = clip.build_model(sd).float().encode_image(image)
    assert half.dtype == torch.float16 and full.dtype == torch.float32
    torch.testing.assert_close(half.float(), full, atol=2e-2, rtol=2e-2)
    lin = nn.Linear(2, 2)
    convert_weights(lin)
    assert lin.weight.dtype == torch.float16


def test_tokenize_matches_simple_tokenizer_and_openai_rules():
    from clip import clip
    from clip.simple_tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    assert tok.encoder["<|startoftext|>"] == 49406 and tok.encoder["<|endoftext|>"] == 49407
    ids = tok.encode("a photo of a dog.")
    row = clip.tokenize("a photo of a dog.")
    assert row.shape == (1, 77) and row.dtype == torch.int32
    assert row[0, :len(ids) + 2].tolist() == [49406] + ids + [49407]
    assert row[0, len(ids) + 2:].abs().sum() == 0
    assert tok.decode([49406] + ids + [49407]).startswith("<|startoftext|>a photo of a dog")
    long_text = " ".join(["dog"] * 100)
    with pytest.raises(RuntimeError, match="too long for context length 77"):
        clip.tokenize(long_text)
    cut = clip.tokenize(long_text, truncate=True)
    assert cut[0, -1].item() == 49407 and (cut[0] != 0).all()
    assert clip.tokenize(["a", "b"], context_length=8).shape == (2, 8)


def test_download_resolves_local_files_only(tmp_path, monkeypatch):
    from clip import clip
    from dassl.utils.errors import WeightsError

    monkeypatch.setenv("HOME", str(tmp_path))
    url = clip._MODELS["RN50"]
    expected = os.path.join(str(tmp_path), ".cache", "clip", "RN50.pt")
    with pytest.raises(WeightsError, match="nothing is downloaded") as err:
        clip._download(url)
    assert expected in str(err.value)
    os.makedirs(os.path.dirname(expected))
    torch.save(tiny_openai_state_dict("rn"), expected)
    assert clip._download(url) == expected
    assert clip._download(url, str(tmp_path / ".cache" / "clip")) == expected
    assert set(clip.available_models()) >= {"RN50", "ViT-B/16", "ViT-B/32"}
    model, preprocess = clip.load("RN50", device="cpu")
    assert model.dtype == torch.float32 and model.visual.input_resolution == 32
    from PIL import Image

    assert preprocess(Image.new("L", (40, 50))).shape == (3, 32, 32)
    with pytest.raises(Exception, match="not found"):
        clip.load("RN51", device="cpu")
