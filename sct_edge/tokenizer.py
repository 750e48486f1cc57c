"""Tokenizers: the byte-level default (vocabulary 256, no download) and a wrapper around a
Hugging Face `tokenizers.Tokenizer` for imported models. Both serialise to JSON for the store.
"""

from __future__ import annotations

import json


class ByteTokenizer:
    """UTF-8 bytes are the tokens: ids 0..255; any text round-trips exactly."""

    kind = "bytes"
    vocab_size = 256
    eos_id: int | None = None
    bos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind})
