"""Write a store as a llama.cpp GGUF file (architecture `llama`) that llama.cpp, ollama and LM Studio load:
hyper-parameters, tokenizer (byte-level BPE vocabulary, merges, pre-tokenizer, token types, special ids,
chat template) and every weight under llama.cpp's name, Q and K rows permuted for GGML's RoPE.

Written with the `gguf` package's `GGUFWriter` in its streaming order: header, metadata and the tensor
table first (shapes and byte sizes are known from the config), then the tensor data one matrix at a time:
each spectral matrix is densified (V diag(s) Uᵀ) only when its turn comes and dropped once written, so
memory stays about one dense matrix (plus its quantised copy) whatever the model's size.

Outtypes: `f32` (exact), `f16`, `bf16`, `q8_0` (quantised by `gguf.quants`); norms stay F32 as llama.cpp's
converter keeps them. Q8_0 blocks are 32 values along a row, so a matrix whose rows are not a multiple of 32
stays F16 and the result lists a note saying so.

The store's byte-level default tokenizer becomes a byte-level BPE vocabulary: the 256 bytes in GPT-2's
byte-to-unicode alphabet as ids 0..255 and no merges (every byte is its own token, so none are needed;
llama.cpp requires the merges key, so an empty list is written). That model has no EOS row, so EOS points at
the NUL byte, which text never contains: generation runs to its length limit.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sct_edge.convert.exporter import dense_tensors
from sct_edge.convert.gguf_reader import PRE_TOKENIZERS, gguf_name, hf_pre_tokenizer, permute_qk
from sct_edge.convert.source_model import expected_shapes
from sct_edge.convert.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, byte_to_unicode, tokenizer_from_json
from sct_edge.errors import SctError
from sct_edge.model.config import ModelConfig
from sct_edge.store.atomic import fsync_dir, publish
from sct_edge.store.store import Store

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f16"
# What llama.cpp's `tokenizer.ggml.pre` says for each pre-tokenizer family the GGUF reader knows.
_PRE_NAME = {"gpt2": "gpt-2", "digits+gpt2": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}
# The byte-level model's EOS: the NUL byte (see the module docstring).
_BYTE_MODEL_EOS = 0


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise SctError("the 'gguf' package is needed to write GGUF files: pip install 'sct-edge[import]'") from None
    return gguf


@dataclass
class GGUFVocabulary:
    """A tokenizer as llama.cpp's `gpt2` (byte-level BPE) tokenizer metadata."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    notes: list[str] = field(default_factory=list)


def _normalised(node: Any) -> Any:
    """A pre-tokenizer's JSON without `trim_offsets`, which moves character offsets but never the tokens."""
    if isinstance(node, dict):
        return {k: _normalised(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_normalised(v) for v in node]
    return node


def _pre_name(hf_json: dict, source: str) -> str:
    """The `tokenizer.ggml.pre` whose split is exactly the tokenizer's pre-tokenizer, or a SctError."""
    import tokenizers

    found = _normalised(hf_json.get("pre_tokenizer"))
    for family, names in PRE_TOKENIZERS.items():
        candidate = tokenizers.Tokenizer(tokenizers.models.BPE())
        candidate.pre_tokenizer, _ = hf_pre_tokenizer(names[0], Path(source))
        if _normalised(json.loads(candidate.to_str())["pre_tokenizer"]) == found:
            return _PRE_NAME[family]
    raise SctError(
        f"{source}: the tokenizer's pre-tokenizer has no llama.cpp equivalent that sct-edge knows "
        f"(known: {', '.join(_PRE_NAME.values())}): {json.dumps(hf_json.get('pre_tokenizer'))[:200]}"
    )


def _bpe_vocabulary(tokenizer: BPETokenizer, source: str) -> GGUFVocabulary:
    gguf = _require_gguf()
    inner = tokenizer.tokenizer
    hf_json = json.loads(inner.to_str())
    if hf_json.get("model", {}).get("type") != "BPE":
        raise SctError(f"{source}: only BPE tokenizers can be written to GGUF (this one is {hf_json['model']['type']})")
    by_id = {i: t for t, i in inner.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise SctError(f"{source}: the tokenizer's ids are not contiguous from 0, which GGUF's token list needs")
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for i, added in inner.get_added_tokens_decoder().items():
        types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf_json["model"].get("merges", [])]
    # The model's own framing, read off what its post-processor adds around a text.
    plain = inner.encode("a", add_special_tokens=False).ids
    framed = inner.encode("a", add_special_tokens=True).ids
    start = framed.index(plain[0]) if plain and plain[0] in framed else 0
    add_bos = start > 0 and framed[0] == tokenizer.bos_id
    add_eos = len(framed) > start + len(plain) and framed[-1] == tokenizer.eos_id
    return GGUFVocabulary(
        tokens=tokens,
        token_types=types,
        merges=merges,
        pre=_pre_name(hf_json, source),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        add_bos=add_bos,
        add_eos=add_eos,
    )


def _byte_vocabulary() -> GGUFVocabulary:
    gguf = _require_gguf()
    symbols = byte_to_unicode()
    return GGUFVocabulary(
        tokens=[symbols[b] for b in range(256)],
        token_types=[int(gguf.TokenType.NORMAL)] * 256,
        merges=[],
        pre="gpt-2",
        bos_id=None,
        eos_id=_BYTE_MODEL_EOS,
        add_bos=False,
        add_eos=False,
        notes=["byte-level tokenizer: 256 byte tokens, no merges; EOS is the NUL byte (the model has no EOS)"],
    )


def gguf_vocabulary(tokenizer: Tokenizer, vocab_size: int, source: str) -> GGUFVocabulary:
    """`tokenizer` as GGUF tokenizer metadata with exactly `vocab_size` tokens (the embedding's rows): ids the
    tokenizer never produces are padded as unused `[PADn]` tokens, as llama.cpp's converter does."""
    gguf = _require_gguf()
    vocab = _byte_vocabulary() if isinstance(tokenizer, ByteTokenizer) else _bpe_vocabulary(tokenizer, source)
    if len(vocab.tokens) > vocab_size:
        raise SctError(
            f"{source}: the tokenizer has {len(vocab.tokens)} tokens but the model's embedding only {vocab_size} rows"
        )
    if len(vocab.tokens) < vocab_size:
        vocab.notes.append(f"{vocab_size - len(vocab.tokens)} embedding rows without a token written as [PADn]")
        for i in range(len(vocab.tokens), vocab_size):
            vocab.tokens.append(f"[PAD{i}]")
            vocab.token_types.append(int(gguf.TokenType.UNUSED))
    return vocab


@dataclass
class PlannedTensor:
    """One tensor of the GGUF file: its sct-edge name, llama.cpp name, numpy shape (out, in) and GGML type."""

    name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any

    @property
    def nbytes(self) -> int:
        gguf = _require_gguf()
        return math.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype))


def plan_tensors(config: ModelConfig, outtype: str) -> tuple[list[PlannedTensor], list[str]]:
    """Every tensor of `config` with the GGML type `outtype` gives it, and notes on the ones that differ."""
    gguf = _require_gguf()
    Q = gguf.GGMLQuantizationType
    matrix_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
    planned, fallback = [], []
    for name, shape in expected_shapes(config).items():
        qtype = Q.F32 if len(shape) == 1 else matrix_type
        if qtype == Q.Q8_0 and shape[-1] % block:
            qtype = Q.F16
            fallback.append(f"{gguf_name(name)} ({shape[-1]})")
        planned.append(PlannedTensor(name, gguf_name(name), tuple(shape), qtype))
    notes = []
    if fallback:
        notes.append(
            f"{len(fallback)} matrices stay F16: rows not a multiple of {block}, which Q8_0 needs: "
            + ", ".join(fallback[:4])
            + (", ..." if len(fallback) > 4 else "")
        )
    return planned, notes


def _open_writer(path: Path) -> Any:
    """A `gguf.GGUFWriter` for `path` that can also write an empty array (a byte vocabulary's merges): the GGUF
    format allows one and llama.cpp reads it, but the stock writer refuses."""
    gguf = _require_gguf()

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
                head = struct.pack("<I", vtype) if add_vtype else b""
                return head + struct.pack("<IQ", sub_type, 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(path, "llama")


def _add_metadata(
    writer: Any, config: ModelConfig, vocab: GGUFVocabulary, chat_template: str | None, file_type: int
) -> None:
    gguf = _require_gguf()
    writer.add_name(config.name)
    writer.add_type("model")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.dim // config.n_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_key_value(
        gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING
    )
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
        # Batched inference pads with EOS, as the Hugging Face LLaMA-family tokenizers do without a PAD token.
        writer.add_pad_token_id(vocab.eos_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(False)
    if chat_template:
        writer.add_chat_template(chat_template)


def _tensor_data(tensor: torch.Tensor, planned: PlannedTensor, config: ModelConfig) -> np.ndarray:
    gguf = _require_gguf()
    array = tensor.detach().to(torch.float32).numpy()
    if planned.name.endswith(".attn.q.weight"):
        array = permute_qk(array, config.n_heads)
    elif planned.name.endswith(".attn.k.weight"):
        array = permute_qk(array, config.n_kv_heads)
    data = gguf.quants.quantize(np.ascontiguousarray(array), planned.qtype)
    return np.ascontiguousarray(data)


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


@dataclass
class GGUFExportResult:
    """What `export_gguf` wrote: the file, its outtype, size, time, tensor count and notes for the user."""

    out: Path
    outtype: str
    bytes: int
    seconds: float
    tensors: int
    notes: list[str]
    modelfile: Path | None = None


def ollama_modelfile(gguf_path: Path, chat_template: str | None) -> str:
    """An ollama Modelfile for `gguf_path`: ChatML templates (SmolLM2, Qwen, ...) are spelled in ollama's Go
    template syntax with `<|im_end|>` as the stop; for others ollama reads the GGUF's own template."""
    lines = [f"FROM ./{gguf_path.name}"]
    if chat_template and "<|im_start|>" in chat_template:
        lines += [
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
            "{{ .Content }}<|im_end|>",
            '{{ end }}<|im_start|>assistant\n"""',
            'PARAMETER stop "<|im_end|>"',
        ]
    return "\n".join(lines) + "\n"


def export_gguf(
    store_path: str | Path, out: str | Path, outtype: str = DEFAULT_OUTTYPE, ollama: bool = False
) -> GGUFExportResult:
    """Write the store at `store_path` as the llama.cpp GGUF file `out`, one dense matrix at a time.

    The file appears whole or not at all: it is written under a temporary name and renamed when complete.
    """
    started = time.perf_counter()
    gguf = _require_gguf()
    if outtype not in OUTTYPES:
        raise SctError(f"GGUF outtype '{outtype}' is not one of {', '.join(OUTTYPES)}")
    store_path, out = Path(store_path), Path(out)
    if not out.parent.is_dir():
        raise SctError(f"{out}: the directory {out.parent} does not exist")
    if out.is_dir():
        raise SctError(f"{out} is a directory: give a file name ending in .gguf")
    partial = out.with_name(f".{out.name}.partial")
    with Store.open(store_path) as store:
        config = store.config
        tokenizer = tokenizer_from_json(store.tokenizer_json())
        chat_template = store.extra.get("chat_template")
        vocab = gguf_vocabulary(tokenizer, config.vocab_size, str(store_path))
        planned, notes = plan_tensors(config, outtype)
        writer = _open_writer(partial)
        try:
            _add_metadata(writer, config, vocab, chat_template, int(gguf.LlamaFileType[FILE_TYPES[outtype]]))
            for p in planned:
                # The table lists byte sizes up front; numpy dtype float32 keeps the logical (out, in) shape.
                writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p, (name, tensor) in zip(planned, dense_tensors(store), strict=True):
                assert name == p.name, (name, p.name)
                writer.write_tensor_data(_tensor_data(tensor, p, config))
            writer.close()
            publish(partial, out)
            fsync_dir(out.parent)
        except BaseException as error:
            writer.close()
            partial.unlink(missing_ok=True)
            if isinstance(error, OSError):
                raise SctError(f"{out}: cannot write the GGUF file ({error.strerror or error})") from None
            raise
    modelfile = None
    if ollama:
        modelfile = out.with_name("Modelfile")
        modelfile.write_text(ollama_modelfile(out, chat_template), encoding="utf-8")
    return GGUFExportResult(
        out=out,
        outtype=outtype,
        bytes=out.stat().st_size,
        seconds=time.perf_counter() - started,
        tensors=len(planned),
        notes=vocab.notes + notes,
        modelfile=modelfile,
    )
