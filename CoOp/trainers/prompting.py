"""Prompt pieces shared by the prompt-learning trainers (CoOp, CoCoOp, DPLCLIP).

CoOp-style prompts are ``[SOS] v_1 ... v_M {classname} . [EOS]``: learnable context vectors ``v_1..v_M`` between
the fixed [SOS] embedding (``token_prefix``) and the fixed class-name/"."/[EOS]/padding embeddings
(``token_suffix``). This module builds the fixed pieces (:class:`PromptTokens`), initial contexts
(:func:`init_context`), assembles prompts for every class token position (:func:`assemble_prompts`) and encodes
prompt embeddings with CLIP's text tower (:func:`encode_prompt_embeddings`). It lives outside any trainer file so
that replacing ``coop.py``/``cocoop.py`` by another implementation breaks no other trainer.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from clip_backbone import TextEncoder, tokenize
from dassl.utils.errors import ConfigError

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
PROMPT_PRECISIONS = ("fp32", "fp16", "amp", "bf16")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (where the official code calls ``.float()``); fp32 and fp64 stay as they are, so a model
    cast to float64 (the golden parity tests) computes in float64 throughout."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ----------------------------------------------------------------------------------------------- prompt pieces
def clip_embed_dim(clip_model: nn.Module) -> int:
    """Dimension D of CLIP's joint image/text embedding."""
    proj = clip_model.text_projection
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])


def count_tokens(text: str, context_length: int) -> int:
    """Number of BPE tokens of ``text`` (without [SOS]/[EOS])."""
    ids = tokenize([text], context_length)[0]
    return int((ids != 0).sum().item()) - 2


class PromptTokens:
    """Token ids and fixed embeddings of ``"<prefix_text> {classname}."`` for every class.

    ``prefix_len`` tokens after [SOS] are the slots that learnable context replaces. ``prefix`` is the [SOS]
    embedding ``[C, 1, width]``, ``suffix`` the rest ``[C, L - 1 - prefix_len, width]`` (class name, ".", [EOS],
    padding); ``name_lens`` the number of class-name tokens (needed for ``middle``/``front``).
    """

    def __init__(self, clip_model: nn.Module, context_length: int, classnames: Sequence[str], prefix_text: str,
                 prefix_len: int) -> None:
        names = [c.replace("_", " ") for c in classnames]
        texts = [f"{prefix_text} {n}." for n in names]
        self.tokenized = tokenize(texts, context_length)
        self.name_lens = [count_tokens(n, context_length) for n in names]
        eot = self.tokenized.argmax(dim=-1)
        expected = torch.tensor([1 + prefix_len + n + 1 for n in self.name_lens])
        if not torch.equal(eot, expected):
            bad = [names[i] for i in range(len(names)) if eot[i] != expected[i]]
            raise ConfigError(f"prompt does not fit the text encoder's context length {context_length} "
                              f"(N_CTX {prefix_len} + class names {bad[:3]}); use fewer context tokens")
        emb = clip_model.token_embedding
        with torch.no_grad():
            embedding = emb(self.tokenized.to(emb.weight.device)).float().cpu()
        self.prefix = embedding[:, :1, :]
        self.suffix = embedding[:, 1 + prefix_len:, :]
        self.n_ctx = prefix_len

    def attach(self, module: nn.Module) -> None:
        """Register the frozen prompt pieces on a prompt learner (``token_prefix``/``token_suffix`` are saved and
        dropped on load; ``tokenized_prompts`` is not saved) and set ``name_lens``, ``n_cls``, ``n_ctx``."""
        module.register_buffer("token_prefix", self.prefix)
        module.register_buffer("token_suffix", self.suffix)
        module.register_buffer("tokenized_prompts", self.tokenized, persistent=False)
        module.name_lens = self.name_lens
        module.n_cls = self.prefix.shape[0]
        module.n_ctx = self.n_ctx


def assemble_prompts(prefix: torch.Tensor, ctx: torch.Tensor, suffix: torch.Tensor, name_lens: Sequence[int],
                     position: str = "end") -> torch.Tensor:
    """Token embeddings ``[..., C, L, width]`` of the prompts with context ``ctx``.

    ``prefix`` ``[C, 1, w]`` and ``suffix`` ``[C, S, w]`` are the fixed pieces; ``ctx`` is ``[M, w]`` (generic),
    ``[C, M, w]`` (class-specific) or ``[..., C, M, w]`` (e.g. one context per image or per domain). Leading
    dimensions of ``ctx`` broadcast over the fixed pieces.
    """
    n_cls = prefix.shape[0]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
    lead = ctx.shape[:-3]
    prefix = prefix.to(ctx.dtype).expand(*lead, *prefix.shape)
    suffix = suffix.to(ctx.dtype).expand(*lead, *suffix.shape)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=-2)
    if position not in ("middle", "front"):
        raise ConfigError(f"CLASS_TOKEN_POSITION must be one of {CLASS_TOKEN_POSITIONS}, got {position!r}")
    half = ctx.shape[-2] // 2
    rows = []
    for i, n in enumerate(name_lens):
        pre, c, suf = prefix[..., i, :, :], ctx[..., i, :, :], suffix[..., i, :, :]
        name, rest = suf[..., :n, :], suf[..., n:, :]
        if position == "middle":
            rows.append(torch.cat([pre, c[..., :half, :], name, c[..., half:, :], rest], dim=-2))
        else:
            rows.append(torch.cat([pre, name, c, rest], dim=-2))
    return torch.stack(rows, dim=-3)


def encode_prompt_embeddings(text_encoder: TextEncoder, prompts: torch.Tensor,
                             tokenized: torch.Tensor) -> torch.Tensor:
    """Text features (fp32, or fp64 for a float64 model) of prompt embeddings ``[..., C, L, w]`` (tokenized
    ``[C, L]``) -> ``[..., C, D]``."""
    lead = prompts.shape[:-3]
    n_cls, length, width = prompts.shape[-3:]
    flat = prompts.reshape(-1, length, width).to(text_encoder.dtype)
    tok = tokenized.repeat(flat.shape[0] // n_cls, 1)
    return upcast(text_encoder(flat, tok)).reshape(*lead, n_cls, -1)


def init_context(clip_model: nn.Module, context_length: int, n_ctx: int, ctx_init: str, n_cls: int = 0,
                 csc: bool = False) -> tuple[torch.Tensor, str, int]:
    """Initial context ``[M, w]`` (or ``[C, M, w]`` when ``csc``), the prompt prefix text and M.

    ``ctx_init`` given: the word embeddings of that text (M = its token count); else N(0, 0.02^2) and the
    placeholder prefix ``"X X ... X"``.
    """
    width = clip_model.token_embedding.weight.shape[1]
    if ctx_init:
        text = ctx_init.replace("_", " ").strip()
        n = count_tokens(text, context_length)
        if n < 1:
            raise ConfigError(f"CTX_INIT {ctx_init!r} has no tokens")
        emb = clip_model.token_embedding
        with torch.no_grad():
            vectors = emb(tokenize([text], context_length).to(emb.weight.device))[0, 1:1 + n].float().cpu()
        if csc:
            vectors = vectors.unsqueeze(0).repeat(n_cls, 1, 1)
        return vectors.clone(), text, n
    if n_ctx < 1:
        raise ConfigError(f"N_CTX must be >= 1 without CTX_INIT, got {n_ctx}")
    vectors = torch.empty(n_cls, n_ctx, width) if csc else torch.empty(n_ctx, width)
    nn.init.normal_(vectors, std=0.02)
    return vectors, " ".join(["X"] * n_ctx), n_ctx


class PromptLearner(nn.Module):
    """CoOp's learnable context ``ctx`` + the fixed ``token_prefix``/``token_suffix`` buffers."""

    def __init__(self, clip_model: nn.Module, context_length: int, classnames: Sequence[str], n_ctx: int = 16,
                 ctx_init: str = "", csc: bool = False, class_token_position: str = "end") -> None:
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ConfigError(f"CLASS_TOKEN_POSITION must be one of {CLASS_TOKEN_POSITIONS}, "
                              f"got {class_token_position!r}")
        vectors, prefix_text, n_ctx = init_context(clip_model, context_length, n_ctx, ctx_init, len(classnames),
                                                   csc)
        print(f'Initial context: "{prefix_text}"  ({"class-specific" if csc else "generic"}, '
              f"{n_ctx} tokens, class token: {class_token_position})")
        self.ctx = nn.Parameter(vectors)
        PromptTokens(clip_model, context_length, classnames, prefix_text, n_ctx).attach(self)
        self.class_token_position = class_token_position

    def forward(self) -> torch.Tensor:
        return assemble_prompts(self.token_prefix, self.ctx, self.token_suffix, self.name_lens,
                                self.class_token_position)
