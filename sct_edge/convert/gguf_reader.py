"""Read a llama.cpp GGUF file (LLaMA architecture) as a `SourceModel`: config, tokenizer, chat template and
dense float32 tensors in sct-edge naming, dequantised one tensor at a time from the memory-mapped file.

RoPE convention: llama.cpp's converter permutes the rows of Q and K so that GGML's RoPE, which rotates
ADJACENT pairs (2j, 2j + 1) of each head, computes what Hugging Face's model computes. This reader undoes
that permutation, so the tensors it yields are the original Hugging Face ones and sct-edge's model must use
Hugging Face's `rotate_half` convention: within each head of size d, dimension j (< d/2) is rotated together
with dimension j + d/2, with frequency theta^(-2j/d).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sct_edge.convert.source_model import SourceModel, check_shapes, expected_shapes, validate_architecture
from sct_edge.convert.tokenizer import BPETokenizer, require_tokenizers
from sct_edge.errors import SctError
from sct_edge.model.config import ModelConfig

# GGML tensor types the reader dequantises (all through gguf.quants.dequantize). Integer types and
# anything newer than these are refused up front, naming the tensor.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
)  # fmt: skip

_GLOBAL_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q",
    "attn_k": "attn.k",
    "attn_v": "attn.v",
    "attn_output": "attn.o",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate",
    "ffn_up": "mlp.up",
    "ffn_down": "mlp.down",
}

# tokenizer.ggml.pre names (llama.cpp's llama-vocab.cpp) -> how the Hugging Face tokenizer splits text.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    # GPT-2's regex inside the byte-level pre-tokenizer; llama.cpp also falls back to a GPT-2-like split
    # for "default" (files converted before tokenizer.ggml.pre existed).
    "gpt2": ("default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe", "trillion"),
    # The GPT-2 regex after splitting every digit on its own (StarCoder's tokenizer, used by SmolLM).
    "digits+gpt2": ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
    "llama3": ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"),
    "qwen2": ("qwen2", "stablelm2"),
}
# llama.cpp matches a whole pre-token against the vocabulary before merging for these (HF ignore_merges).
_IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise SctError("the 'gguf' package is needed to read GGUF files: pip install 'sct-edge[import]'") from None
    return gguf


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` of a Q (n_heads) or K (n_kv_heads) weight's rows, for GGML's RoPE.

    Rows are read as (head, 2, head_dim/2) and the last two axes swapped, interleaving the two halves of
    each head; `unpermute_qk` is its inverse.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of a Q (n_heads) or K (n_kv_heads) weight's rows.

    The converter reshapes rows as (head, 2, head_dim/2) and swaps the last two axes, interleaving the two
    halves of each head; reading the rows as (head, head_dim/2, 2) and swapping back restores them.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class _Metadata:
    """Typed access to GGUF key/value fields with SctErrors naming the file and key."""

    def __init__(self, reader: Any, path: Path):
        self.reader = reader
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as error:  # a corrupt field: numpy/struct errors of several kinds
            raise SctError(f"{self.path}: metadata field {key} is unreadable ({error})") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise SctError(f"{self.path}: GGUF metadata lacks {key}")
        return value


def _as_float(value: Any) -> float:
    # GGUF stores float32: take the shortest decimal that round-trips in float32 (1e-05, not 9.99999974e-06).
    return float(str(np.float32(value)))


def _read_config(meta: _Metadata, path: Path, vocab_size: int, tied: bool) -> ModelConfig:
    try:
        return _build_config(meta, path, vocab_size, tied)
    except (TypeError, ValueError) as error:  # a hyper-parameter stored with a non-numeric type
        raise SctError(f"{path}: a llama.* hyper-parameter has the wrong type ({error})") from None


def _build_config(meta: _Metadata, path: Path, vocab_size: int, tied: bool) -> ModelConfig:
    n_heads = int(meta.require("llama.attention.head_count"))
    dim = int(meta.require("llama.embedding_length"))
    rope_dims = meta.get("llama.rope.dimension_count")
    if rope_dims is not None and n_heads and int(rope_dims) != dim // n_heads:
        raise SctError(f"{path}: partial rotary embeddings ({rope_dims} of {dim // n_heads} dims) are not supported")
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise SctError(f"{path}: RoPE scaling '{scaling}' is not supported")
    config = ModelConfig(
        name=path.stem,
        vocab_size=vocab_size,
        dim=dim,
        n_layers=int(meta.require("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        ffn_dim=int(meta.require("llama.feed_forward_length")),
        max_seq_len=int(meta.get("llama.context_length", 2048)),
        rope_theta=_as_float(meta.get("llama.rope.freq_base", 10000.0)),
        norm_eps=_as_float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=tied,
    )
    if config.n_heads <= 0 or config.n_kv_heads <= 0 or config.dim <= 0:
        raise SctError(f"{path}: head counts and embedding length must be positive")
    validate_architecture(config, path)
    return config


def hf_pre_tokenizer(pre: str, path: Path) -> tuple[Any, Any]:
    """The Hugging Face pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` name `pre` stands for, and its family
    (a key of PRE_TOKENIZERS); `path` names the file in the error for an unknown name."""
    tokenizers = require_tokenizers()
    pts = tokenizers.pre_tokenizers
    family = next((f for f, names in PRE_TOKENIZERS.items() if pre in names), None)
    if family is None:
        known = ", ".join(n for names in PRE_TOKENIZERS.values() for n in names)
        raise SctError(f"{path}: tokenizer pre-tokenizer '{pre}' is not supported (known: {known})")
    if family == "gpt2":
        return pts.ByteLevel(add_prefix_space=False, use_regex=True), family
    if family == "digits+gpt2":
        return pts.Sequence(
            [pts.Digits(individual_digits=True), pts.ByteLevel(add_prefix_space=False, use_regex=True)]
        ), family
    regex = _LLAMA3_REGEX if family == "llama3" else _QWEN2_REGEX
    split = pts.Split(tokenizers.Regex(regex), behavior="isolated", invert=False)
    return pts.Sequence([split, pts.ByteLevel(add_prefix_space=False, use_regex=False)]), family


def _read_tokenizer(meta: _Metadata, path: Path) -> BPETokenizer:
    tokenizers = require_tokenizers()
    model = meta.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise SctError(f"{path}: tokenizer model '{model}' is not supported (only 'gpt2' byte-level BPE)")
    tokens: list[str] = list(meta.require("tokenizer.ggml.tokens"))
    merges_raw: list[str] = list(meta.get("tokenizer.ggml.merges", []))
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):
        raise SctError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SctError(f"{path}: the token list has duplicate entries")
    merges = []
    for merge in merges_raw:
        # Split at the first space after the first character, as llama.cpp does.
        cut = merge.find(" ", 1)
        if cut < 0:
            raise SctError(f"{path}: tokenizer merge '{merge}' has no separating space")
        merges.append((merge[:cut], merge[cut + 1 :]))
    pre = meta.get("tokenizer.ggml.pre", "default")
    pre_tokenizer, _ = hf_pre_tokenizer(pre, path)
    try:
        bpe = tokenizers.models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    except Exception as error:  # tokenizers raises a bare Exception for a merge naming an unknown token
        raise SctError(f"{path}: the tokenizer vocabulary and merges are inconsistent ({error})") from None
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = tokenizers.decoders.ByteLevel()
    # Control tokens (chat markers, BOS/EOS) must encode as one id wherever they appear in the text.
    tok.add_special_tokens(
        [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _TOKEN_CONTROL
        ]
    )
    tok.add_tokens(
        [
            tokenizers.AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _TOKEN_USER_DEFINED
        ]
    )

    def special(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is None:
            return None
        if not 0 <= int(value) < len(tokens):
            raise SctError(f"{path}: tokenizer.ggml.{key}_token_id {value} is outside the vocabulary")
        return int(value)

    bos_id, eos_id = special("bos"), special("eos")
    # The model's own framing: llama.cpp adds BOS/EOS around every prompt when these flags say so.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        bos = [tokens[bos_id]] if add_bos else []
        eos = [tokens[eos_id]] if add_eos else []
        framing = {tokens[i]: i for i in (bos_id if add_bos else None, eos_id if add_eos else None) if i is not None}
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=" ".join([*bos, "$A", *eos]),
            pair=" ".join([*bos, "$A", *eos, *bos, "$B:1", *eos]),
            special_tokens=list(framing.items()),
        )
    return BPETokenizer(tok, bos_id=bos_id, eos_id=eos_id)


def _our_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if (
        len(parts) == 4
        and parts[0] == "blk"
        and parts[1].isdigit()
        and parts[3] == "weight"
        and parts[2] in _BLOCK_NAMES
    ):
        return f"layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.weight"
    return None


def gguf_name(name: str) -> str:
    """The llama.cpp tensor name of sct-edge tensor `name` (the inverse of `_our_name`), for the writer."""
    for gguf_global, ours in _GLOBAL_NAMES.items():
        if name == ours:
            return gguf_global
    _, layer, key = name.split(".", 2)
    block = next(b for b, ours in _BLOCK_NAMES.items() if key == f"{ours}.weight")
    return f"blk.{int(layer)}.{block}.weight"


def read_gguf(path: str | Path) -> SourceModel:
    """Open a LLaMA GGUF file for import; tensor data is read only when `tensors()` is iterated."""
    path = Path(path)
    gguf = _require_gguf()
    if not path.is_file():
        raise SctError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as error:  # GGUFReader raises ValueError, KeyError, IndexError... on bad bytes
        raise SctError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({type(error).__name__}: {error})"
        ) from None
    meta = _Metadata(reader, path)
    arch = meta.require("general.architecture")
    if arch != "llama":
        raise SctError(f"{path}: architecture '{arch}' is not supported (only 'llama')")

    by_name: dict[str, Any] = {}
    for tensor in reader.tensors:
        ours = _our_name(tensor.name)
        if ours is None:
            raise SctError(f"{path}: unexpected tensor {tensor.name} (not part of a plain LLaMA model)")
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise SctError(
                f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot be dequantised"
            )
        by_name[ours] = tensor

    tokenizer_tokens = meta.require("tokenizer.ggml.tokens")
    config = _read_config(meta, path, vocab_size=len(tokenizer_tokens), tied="head.weight" not in by_name)
    tokenizer = _read_tokenizer(meta, path)
    chat_template = meta.get("tokenizer.chat_template")

    # GGUF lists dims innermost first; numpy order (rows = out features) is the reverse.
    found = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in by_name.items()}
    check_shapes(config, found, path)
    shapes = {name: found[name] for name in expected_shapes(config)}

    def load(name: str) -> torch.Tensor:
        tensor = by_name[name]
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as error:  # malformed block data
            raise SctError(
                f"{path}: cannot dequantise tensor {tensor.name} ({tensor.tensor_type.name}): {error}"
            ) from None
        array = array.reshape(shapes[name])
        if name.endswith(".attn.q.weight"):
            array = unpermute_qk(array, config.n_heads)
        elif name.endswith(".attn.k.weight"):
            array = unpermute_qk(array, config.n_kv_heads)
        # A writable C-contiguous float32 copy: the memory map is read-only and must not be aliased.
        return torch.from_numpy(np.require(array, dtype=np.float32, requirements=["C", "W"]))

    return SourceModel(
        config=config, tokenizer=tokenizer, chat_template=chat_template, path=path, shapes=shapes, load=load
    )
