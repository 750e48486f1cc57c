"""Tokenizers: the byte tokenizer, the BPE wrapper, JSON round trips for the store, the byte tokenizer's
Hugging Face equivalent, and the real SmolLM2 tokenizer rebuilt from GGUF metadata."""

from __future__ import annotations

import json
import sys

import pytest

from sct_edge.convert.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    hf_tokenizer_json,
    tokenizer_from_hf_json,
    tokenizer_from_json,
)
from sct_edge.errors import SctError

TEXTS = [
    "The capital of France is Paris.",
    "café, naïve, Ærøskøbing — 中文字符 and emoji 😀🚀",
    "digits 0123456789 and 3.14159, year 2024",
    "  leading spaces\ttabs\nnewlines\r\n  ",
    "",
]


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert isinstance(tokenizer_from_json(tok.to_json()), ByteTokenizer)


def test_bpe_json_round_trip(toy_bpe):
    tok = BPETokenizer(toy_bpe, bos_id=1, eos_id=2)
    restored = tokenizer_from_json(tok.to_json())
    assert isinstance(restored, BPETokenizer)
    assert (restored.kind, restored.vocab_size, restored.bos_id, restored.eos_id) == ("bpe", 300, 1, 2)
    for text in TEXTS:
        assert restored.encode(text) == tok.encode(text) == toy_bpe.encode(text).ids
        assert restored.decode(restored.encode(text)) == text
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_byte_tokenizer_has_an_exact_hugging_face_equivalent():
    tokenizers = pytest.importorskip("tokenizers")
    text = hf_tokenizer_json(ByteTokenizer())
    hf = tokenizers.Tokenizer.from_str(text)
    byte = ByteTokenizer()
    assert hf.get_vocab_size() == 256
    for sample in TEXTS:
        assert hf.encode(sample).ids == byte.encode(sample)
        assert hf.decode(byte.encode(sample)) == sample
    assert isinstance(tokenizer_from_hf_json(text), ByteTokenizer)
    # Any other tokenizer.json stays a BPE tokenizer.
    edited = json.loads(text)
    edited["model"]["vocab"]["extra"] = 256
    assert isinstance(tokenizer_from_hf_json(json.dumps(edited)), BPETokenizer)


def test_bad_tokenizer_json_is_an_error():
    with pytest.raises(SctError, match="not valid"):
        tokenizer_from_json("{not json")
    with pytest.raises(SctError, match="unknown kind 'sentencepiece'"):
        tokenizer_from_json(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(SctError, match="kind 'bpe' is not valid"):
        tokenizer_from_json(json.dumps({"kind": "bpe", "tokenizer": {"model": "nonsense"}}))
    with pytest.raises(SctError, match="tokenizer.json is not a valid"):
        tokenizer_from_hf_json("[]")


def test_missing_tokenizers_package_says_how_to_install(monkeypatch, toy_bpe):
    data = BPETokenizer(toy_bpe).to_json()
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(SctError, match=r"pip install 'sct-edge\[import\]'"):
        tokenizer_from_json(data)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    from sct_edge.convert.gguf_reader import read_gguf

    return read_gguf(smollm2_gguf).tokenizer


@pytest.mark.realmodel
def test_smollm2_tokenizer_round_trips(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.vocab_size == 49152
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # The byte-level vocabulary covers everything: fewer ids than bytes for ordinary text.
        assert len(ids) <= len(text.encode("utf-8"))
    # SmolLM splits numbers into single digits (its "smollm" pre-tokenizer)
    digits = tok.encode("0123456789")
    assert len(digits) == 10 and tok.decode(digits) == "0123456789"
    assert len(tok.encode("The capital of France is")) == 5
    # chat markers are single special tokens
    assert tok.encode("<|im_start|>") == [tok.token_to_id("<|im_start|>")]
    restored = tokenizer_from_json(tok.to_json())
    for text in TEXTS:
        assert restored.encode(text) == tok.encode(text)
    assert (restored.bos_id, restored.eos_id) == (tok.bos_id, tok.eos_id)
