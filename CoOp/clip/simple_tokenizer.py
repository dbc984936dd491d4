"""OpenAI's ``SimpleTokenizer`` API over open_clip's byte-level BPE tokenizer (same vocabulary and ids).

open_clip spells the special tokens ``<start_of_text>``/``<end_of_text>``; OpenAI's ``<|startoftext|>`` /
``<|endoftext|>`` are added to ``encoder`` (same ids) and used by ``decode``.
"""
from __future__ import annotations

from open_clip.tokenizer import SimpleTokenizer as _OpenClipTokenizer
from open_clip.tokenizer import default_bpe

# OpenAI spelling -> open_clip spelling
SPECIAL_TOKENS = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}


class SimpleTokenizer(_OpenClipTokenizer):
    """``encode(text) -> ids`` (no start/end tokens), ``decode(ids) -> text``, ``encoder``/``decoder`` dicts."""

    def __init__(self, bpe_path: str = default_bpe()) -> None:
        super().__init__(bpe_path)
        for openai_name, open_clip_name in SPECIAL_TOKENS.items():
            token_id = self.encoder[open_clip_name]
            self.encoder[openai_name] = token_id
            self.decoder[token_id] = openai_name
