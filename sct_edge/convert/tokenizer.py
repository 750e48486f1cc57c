"""Tokenizers: the byte-level default (vocabulary 256, no download) and a wrapper around a
Hugging Face `tokenizers.Tokenizer` for imported models. Both serialise to JSON for the store.

`tokenizer_from_json` restores either kind from `to_json()` output; `hf_tokenizer_json` and
`tokenizer_from_hf_json` convert to and from a Hugging Face `tokenizer.json` (the byte tokenizer has an
exact HF equivalent: a byte-level BPE with the 256 byte symbols as ids 0..255 and no merges).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sct_edge.errors import SctError

if TYPE_CHECKING:
    import tokenizers


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


def require_tokenizers() -> Any:
    """The `tokenizers` module, or a SctError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise SctError(
            "the 'tokenizers' package is needed for imported models: pip install 'sct-edge[import]'"
        ) from None
    return tokenizers


class BPETokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE for LLaMA-family models) behind the
    ByteTokenizer interface.

    `encode` applies the model's own post-processor, so a model whose tokenizer adds BOS gets it, as
    with Hugging Face's `tokenizer(text)`. `decode` drops special tokens by default (also like Hugging
    Face), so `decode(encode(text)) == text` for ordinary text; pass `skip_special_tokens=False` to see
    chat markers such as `<|im_end|>`.
    """

    kind = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_id: int | None = None, eos_id: int | None = None):
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                "tokenizer": json.loads(self.tokenizer.to_str()),
            }
        )


Tokenizer = ByteTokenizer | BPETokenizer


def tokenizer_from_json(text: str) -> Tokenizer:
    """Restore a tokenizer from its `to_json()` output."""
    try:
        data = json.loads(text)
        kind = data["kind"]
    except (ValueError, TypeError, KeyError):
        raise SctError("tokenizer JSON is not valid (expected an object with a 'kind' field)") from None
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    if kind == BPETokenizer.kind:
        tokenizers = require_tokenizers()
        try:
            inner = tokenizers.Tokenizer.from_str(json.dumps(data["tokenizer"]))
        except Exception as error:  # a missing key, or tokenizers' bare Exception on a bad definition
            raise SctError(f"tokenizer JSON of kind 'bpe' is not valid: {error}") from None
        return BPETokenizer(inner, bos_id=data.get("bos_id"), eos_id=data.get("eos_id"))
    raise SctError(f"tokenizer JSON has unknown kind '{kind}' (known: bytes, bpe)")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters, the alphabet every
    byte-level BPE vocabulary (and Hugging Face's ByteLevel pre-tokenizer) is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_tokenizer_hf() -> tokenizers.Tokenizer:
    tokenizers = require_tokenizers()
    vocab = {char: b for b, char in byte_to_unicode().items()}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    # No regex split: every byte is its own token whatever the split, so the plain byte map is exact.
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """The Hugging Face `tokenizer.json` text for `tokenizer` (an exact equivalent for the byte tokenizer)."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.tokenizer.to_str(pretty=True)
    return _byte_tokenizer_hf().to_str(pretty=True)


def tokenizer_from_hf_json(text: str, bos_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
    """A tokenizer from Hugging Face `tokenizer.json` text: a ByteTokenizer when the file is exactly the
    one `hf_tokenizer_json(ByteTokenizer())` writes (so export then import gives the byte tokenizer back),
    a BPETokenizer otherwise."""
    tokenizers = require_tokenizers()
    try:
        inner = tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # tokenizers raises a bare Exception on malformed files
        raise SctError(f"tokenizer.json is not a valid Hugging Face tokenizer: {error}") from None
    if bos_id is None and eos_id is None and json.loads(inner.to_str()) == json.loads(_byte_tokenizer_hf().to_str()):
        return ByteTokenizer()
    return BPETokenizer(inner, bos_id=bos_id, eos_id=eos_id)
