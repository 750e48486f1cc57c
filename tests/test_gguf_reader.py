"""GGUF import: tiny LLaMA files written with gguf.GGUFWriter the way llama.cpp's converter writes them
(Q/K rows permuted, GGUF dims order), read back as the original Hugging Face tensors; bad files; SmolLM2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sct_edge.convert.gguf_reader import read_gguf, unpermute_qk
from sct_edge.convert.source_model import expected_shapes
from sct_edge.convert.tokenizer import BPETokenizer
from sct_edge.errors import SctError
from sct_edge.model.config import ModelConfig, get_preset

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

GGUF_BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn.q": "attn_q",
    "attn.k": "attn_k",
    "attn.v": "attn_v",
    "attn.o": "attn_output",
    "mlp_norm": "ffn_norm",
    "mlp.gate": "ffn_gate",
    "mlp.up": "ffn_up",
    "mlp.down": "ffn_down",
}
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny_config(dim: int = 64, tied: bool = False, vocab: int = 300) -> ModelConfig:
    return ModelConfig(
        name="tiny-gguf", vocab_size=vocab, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=dim * 2,
        max_seq_len=128, rope_theta=50000.0, norm_eps=1e-5, tie_embeddings=tied,
    )  # fmt: skip


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, applied to HF q_proj / k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    globals_ = {
        "embed.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
        "head.weight": "output.weight",
    }
    if name in globals_:
        return globals_[name]
    _, i, *inner, _ = name.split(".")
    return f"blk.{i}.{GGUF_BLOCK_NAMES['.'.join(inner)]}.weight"


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.2 * rng.standard_normal(shape)).astype(
            np.float32
        )
        for name, shape in expected_shapes(config).items()
    }


def write_gguf(
    path: Path,
    config: ModelConfig,
    weights: dict[str, np.ndarray],
    vocab: tuple[list[str], list[str]],
    qtype=Q.F32,
    arch: str = "llama",
    pre: str = "smollm",
    tokenizer_model: str = "gpt2",
    add_bos: bool = False,
    raw: dict[str, tuple[np.ndarray, object]] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """A GGUF file as llama.cpp's converter writes it: Q/K permuted, matrices in `qtype`, norms in F32.
    `raw` overrides a tensor with (bytes, type) written as is."""
    tokens, merges = vocab
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    for name, array in weights.items():
        if name.endswith("attn.q.weight"):
            array = llamacpp_permute(array, config.n_heads)
        elif name.endswith("attn.k.weight"):
            array = llamacpp_permute(array, config.n_kv_heads)
        if raw and name in raw:
            data, dtype = raw[name]
            w.add_tensor(gguf_name(name), data, raw_dtype=dtype)
        elif array.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(name), array)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(name), array.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unpermute_inverts_llamacpp_permute():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3, 6):
        assert np.array_equal(unpermute_qk(llamacpp_permute(w, heads), heads), w)
    # and it is a real reordering, not the identity, so the tests below would see a missing un-permute
    assert not np.array_equal(llamacpp_permute(w, 2), w)


@pytest.mark.parametrize("tied", [False, True])
def test_f32_reads_back_exactly_in_hf_layout(tmp_path, toy_bpe_vocab, tied):
    config = tiny_config(tied=tied)
    weights = random_weights(config)
    source = read_gguf(write_gguf(tmp_path / "tiny.gguf", config, weights, toy_bpe_vocab))
    assert source.config == ModelConfig.from_dict({**config.to_dict(), "name": "tiny"})
    assert source.tensor_names() == list(weights)
    assert ("head.weight" in source.shapes) is not tied
    assert source.chat_template == TEMPLATE
    count = 0
    for name, tensor in source.tensors():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert torch.equal(tensor, torch.from_numpy(weights[name])), name
        count += 1
    assert count == len(weights)


def test_f16_and_q8_0_to_quantisation_tolerance(tmp_path, toy_bpe_vocab):
    config = tiny_config()
    weights = random_weights(config)
    f16 = read_gguf(write_gguf(tmp_path / "f16.gguf", config, weights, toy_bpe_vocab, qtype=Q.F16))
    q8 = read_gguf(write_gguf(tmp_path / "q8.gguf", config, weights, toy_bpe_vocab, qtype=Q.Q8_0))
    for (name, a), (_, b) in zip(f16.tensors(), q8.tensors(), strict=True):
        original = weights[name]
        if original.ndim == 1:  # norms stay F32 in GGUF files, as llama.cpp writes them
            assert np.array_equal(a.numpy(), original) and np.array_equal(b.numpy(), original), name
            continue
        assert np.array_equal(a.numpy(), original.astype(np.float16).astype(np.float32)), name
        # Row permutation commutes with row-wise block quantisation: exactly what Q8_0 keeps of the original.
        assert np.array_equal(b.numpy(), gguf.quants.dequantize(gguf.quants.quantize(original, Q.Q8_0), Q.Q8_0))
        np.testing.assert_allclose(b.numpy(), original, atol=0.01 * np.abs(original).max(), rtol=0)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.BF16], ids=lambda q: q.name)
def test_other_quantisers_close_to_original(tmp_path, toy_bpe_vocab, qtype):
    config = tiny_config()
    weights = random_weights(config)
    source = read_gguf(write_gguf(tmp_path / "q.gguf", config, weights, toy_bpe_vocab, qtype=qtype))
    for name, tensor in source.tensors():
        scale = np.abs(weights[name]).max()
        np.testing.assert_allclose(tensor.numpy(), weights[name], atol=0.15 * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_decode_with_layout_and_unpermute(tmp_path, toy_bpe_vocab, qtype):
    """gguf-py has no K-quant quantiser: write valid-format random blocks and check the reader decodes each
    matrix as gguf's dequantiser does, in (out, in) layout and with Q/K rows un-permuted."""
    config = tiny_config(dim=256)
    weights = random_weights(config)
    rng = np.random.default_rng(1)
    raw = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 2:
            # Bytes below 0x3C keep every fp16 scale finite and small.
            raw[name] = (rng.integers(0, 0x3C, gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8), qtype)
    source = read_gguf(write_gguf(tmp_path / "k.gguf", config, weights, toy_bpe_vocab, raw=raw))
    for name, tensor in source.tensors():
        if name not in raw:
            continue
        expected = gguf.quants.dequantize(raw[name][0], qtype)
        if name.endswith("attn.q.weight"):
            expected = unpermute_qk(expected, config.n_heads)
        elif name.endswith("attn.k.weight"):
            expected = unpermute_qk(expected, config.n_kv_heads)
        assert tensor.shape == expected_shapes(config)[name]
        assert np.isfinite(expected).all()
        assert np.array_equal(tensor.numpy(), expected), name


def test_rebuilt_tokenizer_matches_the_original(tmp_path, toy_bpe, toy_bpe_vocab):
    source = read_gguf(write_gguf(tmp_path / "tiny.gguf", tiny_config(), random_weights(tiny_config()), toy_bpe_vocab))
    tok = source.tokenizer
    assert isinstance(tok, BPETokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, toy_bpe.get_vocab_size())
    for text in ["The capital of France is Paris.", "café 中文 😀 12345", "  spaces\tand\nnewlines  "]:
        assert tok.encode(text) == toy_bpe.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    # control tokens encode as one id anywhere in the text
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user<|im_end|>")[-1] == 2


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "default"])
def test_other_pre_tokenizers_and_bos_framing(tmp_path, toy_bpe_vocab, pre):
    """Other pre-tokenizer families build and stay lossless; add_bos_token frames every encoding with BOS."""
    config = tiny_config()
    path = write_gguf(tmp_path / "p.gguf", config, random_weights(config), toy_bpe_vocab, pre=pre, add_bos=True)
    tok = read_gguf(path).tokenizer
    for text in ["The capital of France is Paris.", "café 中文 😀 12345", "it's  two\n\nlines"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id == 1 and 1 not in ids[1:]
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>" + text


def test_non_llama_architecture_is_refused(tmp_path, toy_bpe_vocab):
    # Qwen2 files carry Q/K/V biases; the architecture, not an odd tensor, is what the error names.
    biases = {"blk.0.attn_q.bias": np.zeros(64, dtype=np.float32)}
    config = tiny_config()
    path = write_gguf(
        tmp_path / "q.gguf", config, random_weights(config), toy_bpe_vocab, arch="qwen2", extra_tensors=biases
    )
    with pytest.raises(SctError, match=r"q\.gguf.*architecture 'qwen2'"):
        read_gguf(path)


def test_unsupported_tensor_type_is_named(tmp_path, toy_bpe_vocab):
    config = tiny_config()
    weights = random_weights(config)
    raw = {"layers.1.mlp_norm.weight": (np.ones(config.dim, dtype=np.int32), None)}
    path = write_gguf(tmp_path / "i32.gguf", config, weights, toy_bpe_vocab, raw=raw)
    with pytest.raises(SctError, match=r"blk\.1\.ffn_norm\.weight has type I32"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.995, 0.0001])
def test_truncated_file_is_an_error(tmp_path, toy_bpe_vocab, keep):
    path = write_gguf(tmp_path / "cut.gguf", tiny_config(), random_weights(tiny_config()), toy_bpe_vocab)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(SctError, match=r"cut\.gguf"):
        read_gguf(path)


def test_not_a_gguf_file_and_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(SctError, match="junk.gguf.*not a readable GGUF"):
        read_gguf(junk)
    with pytest.raises(SctError, match="no such file"):
        read_gguf(tmp_path / "absent.gguf")


def test_missing_and_unexpected_tensors_are_errors(tmp_path, toy_bpe_vocab):
    config = tiny_config()
    weights = random_weights(config)
    del weights["layers.1.mlp.up.weight"]
    with pytest.raises(SctError, match="missing tensor layers.1.mlp.up.weight"):
        read_gguf(write_gguf(tmp_path / "a.gguf", config, weights, toy_bpe_vocab))
    weights = random_weights(config)
    extra = {"rope_freqs.weight": np.ones(config.head_dim // 2, dtype=np.float32)}
    with pytest.raises(SctError, match="unexpected tensor rope_freqs.weight"):
        read_gguf(write_gguf(tmp_path / "b.gguf", config, weights, toy_bpe_vocab, extra_tensors=extra))


def test_unsupported_tokenizers_are_errors(tmp_path, toy_bpe_vocab):
    config = tiny_config()
    weights = random_weights(config)
    with pytest.raises(SctError, match="tokenizer model 'llama'"):
        read_gguf(write_gguf(tmp_path / "a.gguf", config, weights, toy_bpe_vocab, tokenizer_model="llama"))
    with pytest.raises(SctError, match="pre-tokenizer 'no-such-pre'"):
        read_gguf(write_gguf(tmp_path / "b.gguf", config, weights, toy_bpe_vocab, pre="no-such-pre"))


@pytest.mark.realmodel
def test_smollm2_config_tokenizer_and_tensors(smollm2_gguf):
    source = read_gguf(smollm2_gguf)
    preset = get_preset("smollm2-135m")
    assert source.config.to_dict() == {**preset.to_dict(), "name": smollm2_gguf.stem}
    tok = source.tokenizer
    ids = tok.encode("The capital of France is")
    assert [tok.tokenizer.id_to_token(i) for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert tok.decode(ids) == "The capital of France is"
    assert "<|im_start|>" in source.chat_template
    assert tok.token_to_id("<|im_end|>") == tok.eos_id
    shapes = expected_shapes(source.config)
    assert source.shapes == shapes
    for name, tensor in source.tensors():
        assert tensor.shape == shapes[name] and torch.isfinite(tensor).all(), name


@pytest.mark.realmodel
def test_smollm2_dense_greedy_decoding_says_paris(smollm2_gguf):
    """End-to-end check of the un-permutation and RoPE convention: the imported model answers correctly."""
    from sct_edge.model.transformer import Transformer

    source = read_gguf(smollm2_gguf)
    model = Transformer(source.config, spectral=False, device="meta")
    model.load_state_dict(dict(source.tensors()), strict=True, assign=True)
    ids = source.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert source.tokenizer.decode(ids).startswith("The capital of France is Paris")
