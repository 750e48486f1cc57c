"""GGUF export (`sct-edge export STORE OUT.gguf`): read back with the `gguf` package's own reader for every
outtype (names, shapes, types, metadata, values against the store's dense matrices) and with sct-edge's
importer; the byte-level default; bad input. llama.cpp itself loads the exports in tests/test_llamacpp.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_gguf_reader import gguf_name as reference_gguf_name
from test_gguf_reader import llamacpp_permute
from test_import_export import TEMPLATE, TEXT, hf_config, hf_weights, write_hf_dir

from sct_edge.cli import main
from sct_edge.convert.exporter import dense_tensors
from sct_edge.convert.gguf_reader import read_gguf
from sct_edge.convert.gguf_writer import OUTTYPES, export_gguf
from sct_edge.convert.importer import ImportPolicy, import_model
from sct_edge.convert.tokenizer import byte_to_unicode, tokenizer_from_json
from sct_edge.errors import SctError
from sct_edge.store.store import Store

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# Largest |exported - dense| allowed, relative to the matrix's largest |value|.
TOLERANCE = {"f32": 1e-7, "f16": 1e-3, "bf16": 8e-3, "q8_0": 8e-3}
TYPE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


@pytest.fixture(scope="module")
def spectral_store(tmp_path_factory, toy_bpe):
    """A rank-4 spectral store imported from a small Hugging Face checkpoint (toy BPE tokenizer, ChatML template);
    exports only read it."""
    root = tmp_path_factory.mktemp("gguf-export")
    config = hf_config(toy_bpe.get_vocab_size())
    write_hf_dir(root / "hf", config, hf_weights(config), toy_bpe)
    import_model(root / "hf", root / "store", ImportPolicy(rank=4))
    return root / "store"


def dense_reference(store_path) -> dict[str, np.ndarray]:
    """The store's dense tensors in llama.cpp naming and layout (Q and K permuted as llama.cpp's converter does)."""
    with Store.open(store_path) as store:
        config = store.config
        out = {}
        for name, tensor in dense_tensors(store):
            array = tensor.to(torch.float32).numpy().copy()
            if name.endswith("attn.q.weight"):
                array = llamacpp_permute(array, config.n_heads)
            elif name.endswith("attn.k.weight"):
                array = llamacpp_permute(array, config.n_kv_heads)
            out[reference_gguf_name(name)] = array
    return out


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_round_trip_through_the_gguf_reader(tmp_path, spectral_store, toy_bpe, outtype):
    result = export_gguf(spectral_store, tmp_path / "model.gguf", outtype=outtype)
    reference = dense_reference(spectral_store)
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    config = hf_config(toy_bpe.get_vocab_size())

    assert [t.name for t in reader.tensors] == list(reference)
    for t in reader.tensors:
        expected = reference[t.name]
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == expected.shape, t.name
        if expected.ndim == 1:
            assert t.tensor_type == Q.F32
        elif outtype == "q8_0" and expected.shape[-1] % 32:
            assert t.tensor_type == Q.F16, t.name  # ffn_down's rows are 48 long
        else:
            assert t.tensor_type == TYPE[outtype], t.name
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        error = np.abs(values - expected).max() / np.abs(expected).max()
        assert error <= TOLERANCE[outtype], (t.name, error)
    if outtype == "q8_0":
        assert result.notes == ["2 matrices stay F16: rows not a multiple of 32, which Q8_0 needs: "
                                "blk.0.ffn_down.weight (48), blk.1.ffn_down.weight (48)"]  # fmt: skip
    else:
        assert result.notes == []

    field = {name: f.contents() for name, f in reader.fields.items()}
    assert field["general.architecture"] == "llama"
    hyper = {
        "context_length": config.max_seq_len, "embedding_length": config.dim, "block_count": config.n_layers,
        "feed_forward_length": config.ffn_dim, "attention.head_count": config.n_heads,
        "attention.head_count_kv": config.n_kv_heads, "rope.dimension_count": config.dim // config.n_heads,
        "vocab_size": config.vocab_size,
    }  # fmt: skip
    for key, value in hyper.items():
        assert field[f"llama.{key}"] == value, key
    assert field["llama.rope.freq_base"] == pytest.approx(config.rope_theta)
    assert field["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    file_types = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}
    assert field["general.file_type"] == file_types[outtype]
    assert field["general.quantization_version"] == 2
    tokens = [toy_bpe.id_to_token(i) for i in range(toy_bpe.get_vocab_size())]
    assert field["tokenizer.ggml.model"] == "gpt2"
    assert field["tokenizer.ggml.pre"] == "smollm"  # digits split one by one, then GPT-2's byte-level regex
    assert field["tokenizer.ggml.tokens"] == tokens
    assert field["tokenizer.ggml.token_type"] == [3 if t.startswith("<|") else 1 for t in tokens]
    assert len(field["tokenizer.ggml.merges"]) > 0
    assert field["tokenizer.ggml.bos_token_id"] == tokens.index("<|im_start|>")
    assert field["tokenizer.ggml.eos_token_id"] == tokens.index("<|im_end|>")
    assert field["tokenizer.ggml.padding_token_id"] == tokens.index("<|im_end|>")
    assert field["tokenizer.ggml.add_bos_token"] is False
    assert field["tokenizer.chat_template"] == TEMPLATE


def test_sct_edge_imports_its_own_export_back(tmp_path, spectral_store):
    export_gguf(spectral_store, tmp_path / "model.gguf", outtype="f32")
    source = read_gguf(tmp_path / "model.gguf")
    with Store.open(spectral_store) as store:
        ours = tokenizer_from_json(store.tokenizer_json())
        assert dataclasses.replace(source.config, name=store.config.name, ranks=store.config.ranks) == store.config
        for name, tensor in dense_tensors(store):
            torch.testing.assert_close(source.tensor(name), tensor.to(torch.float32), rtol=0, atol=1e-6)
    assert source.tokenizer.encode(TEXT) == ours.encode(TEXT)
    assert source.chat_template == TEMPLATE


def test_the_byte_level_default_exports_as_a_byte_bpe_vocabulary(tmp_path):
    assert main(["init", "--preset", "tiny", str(tmp_path / "tiny")]) == 0
    result = export_gguf(tmp_path / "tiny", tmp_path / "tiny.gguf", outtype="q8_0")
    assert result.notes == [
        "byte-level tokenizer: 256 byte tokens, no merges; EOS is the NUL byte (the model has no EOS)"
    ]
    field = {name: f.contents() for name, f in gguf.GGUFReader(tmp_path / "tiny.gguf").fields.items()}
    symbols = byte_to_unicode()
    assert field["tokenizer.ggml.tokens"] == [symbols[b] for b in range(256)]
    assert field["tokenizer.ggml.merges"] == []
    assert field["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp's name for GPT-2's split
    assert field["tokenizer.ggml.eos_token_id"] == 0
    assert "tokenizer.chat_template" not in field
    text = "héllo, wörld 123 😀"
    assert read_gguf(tmp_path / "tiny.gguf").tokenizer.encode(text) == list(text.encode("utf-8"))


def test_ollama_modelfile_beside_the_file(tmp_path, spectral_store, capsys):
    assert main(["export", str(spectral_store), str(tmp_path / "m.gguf"), "--outtype", "f16", "--ollama"]) == 0
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n")
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    out = capsys.readouterr().out
    assert "(GGUF, f16)" in out and "ollama create NAME -f" in out


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, spectral_store, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        ([str(tmp_path / "missing" / "m.gguf")], "m.gguf: the directory"),
        ([str(tmp_path / "m.gguf"), "--outtype", "q4_k"], "GGUF outtype 'q4_k' is not one of f32, f16, bf16, q8_0"),
        ([str(tmp_path / "hf-out"), "--outtype", "f16"], "--outtype and --ollama apply to GGUF exports"),
        ([str(tmp_path / "m.gguf"), "--dtype", "bfloat16"], "--dtype applies to Hugging Face exports"),
    ]
    for args, message in cases:
        assert main(["export", str(spectral_store), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(SctError, match="is a directory"):
        export_gguf(spectral_store, tmp_path, outtype="f32")
