"""Hugging Face LLaMA directories: write_hf -> read_hf round trips (single file and sharded), a directory
written independently with safetensors' own writer in Hugging Face naming, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sct_edge.convert.hf_checkpoint import hf_name, read_hf, write_hf
from sct_edge.convert.source_model import expected_shapes
from sct_edge.convert.tokenizer import BPETokenizer, ByteTokenizer
from sct_edge.errors import SctError
from sct_edge.model.config import ModelConfig

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def tiny_config(tied: bool = False, vocab: int = 300) -> ModelConfig:
    return ModelConfig(
        name="tiny-hf", vocab_size=vocab, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48,
        max_seq_len=64, rope_theta=20000.0, norm_eps=1e-6, tie_embeddings=tied,
    )  # fmt: skip


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in expected_shapes(config).items()}


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_round_trip_is_exact(tmp_path, toy_bpe, tied):
    config = tiny_config(tied=tied)
    tensors = random_tensors(config)
    tokenizer = BPETokenizer(toy_bpe, bos_id=1, eos_id=2)
    out = tmp_path / "export"
    # A generator, as an exporter densifying one matrix at a time would pass it.
    write_hf(out, config, ((n, t) for n, t in tensors.items()), tokenizer, TEMPLATE, max_shard_bytes=20_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    assert not list(out.glob("*.partial"))
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["tie_word_embeddings"] is tied

    source = read_hf(out)
    assert source.config == ModelConfig.from_dict({**config.to_dict(), "name": "export"})
    assert source.tensor_names() == list(tensors)
    for name, tensor in source.tensors():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, tensors[name]), name
    assert source.chat_template == TEMPLATE
    assert isinstance(source.tokenizer, BPETokenizer)
    assert (source.tokenizer.bos_id, source.tokenizer.eos_id) == (1, 2)
    text = "The capital of France is Paris, café 中文 😀 2024"
    assert source.tokenizer.encode(text) == tokenizer.encode(text)


def test_single_file_is_plain_safetensors(tmp_path):
    config = tiny_config(vocab=256)
    tensors = random_tensors(config)
    out = write_hf(tmp_path / "m", config, tensors.items(), ByteTokenizer())
    assert not (out / "model.safetensors.index.json").exists()
    # An independent reader sees Hugging Face names and our values.
    loaded = load_file(out / "model.safetensors")
    assert set(loaded) == {hf_name(n) for n in tensors}
    assert torch.equal(loaded["model.layers.2.self_attn.k_proj.weight"], tensors["layers.2.attn.k.weight"])
    source = read_hf(out)
    assert isinstance(source.tokenizer, ByteTokenizer)
    assert source.chat_template is None
    assert all(torch.equal(t, tensors[n]) for n, t in source.tensors())


def test_rewriting_a_directory_replaces_the_old_weights(tmp_path, toy_bpe):
    config = tiny_config()
    tokenizer = BPETokenizer(toy_bpe)
    out = tmp_path / "m"
    write_hf(out, config, random_tensors(config, 1).items(), tokenizer, max_shard_bytes=20_000)
    fresh = random_tensors(config, 2)
    write_hf(out, config, fresh.items(), tokenizer)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert all(torch.equal(t, fresh[n]) for n, t in read_hf(out).tensors())


def test_bfloat16_export(tmp_path):
    config = tiny_config(vocab=256)
    tensors = random_tensors(config)
    out = write_hf(tmp_path / "m", config, tensors.items(), ByteTokenizer(), dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, tensor in read_hf(out).tensors():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, tensors[name].to(torch.bfloat16).float()), name


def test_reads_a_directory_in_hugging_face_format(tmp_path, toy_bpe):
    """Files as transformers' save_pretrained lays them out (bf16, lm_head present although tied,
    tokenizer_config special tokens as strings), written here with safetensors' own writer."""
    config = tiny_config(tied=True)
    tensors = random_tensors(config)
    hf = {hf_name(n): t.to(torch.bfloat16) for n, t in tensors.items()}
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()
    first = dict(list(hf.items())[:10])
    rest = dict(list(hf.items())[10:])
    save_file(first, tmp_path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(rest, tmp_path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first} | {
        k: "model-00002-of-00002.safetensors" for k in rest
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 48,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 64,
                "rms_norm_eps": 1e-06,
                "rope_theta": 20000.0,
                "vocab_size": 300,
                "tie_word_embeddings": True,
                "torch_dtype": "bfloat16",
                "hidden_act": "silu",
                "rope_scaling": None,
                "bos_token_id": 0,
                "eos_token_id": [2, 0],
            }
        )  # fmt: skip
    )
    (tmp_path / "tokenizer.json").write_text(toy_bpe.to_str())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": TEMPLATE})
    )
    source = read_hf(tmp_path)
    assert source.config == ModelConfig.from_dict({**config.to_dict(), "name": tmp_path.name})
    assert "head.weight" not in source.tensor_names()
    for name, tensor in source.tensors():
        assert torch.equal(tensor, tensors[name].to(torch.bfloat16).float()), name
    assert (source.tokenizer.bos_id, source.tokenizer.eos_id) == (1, 2)
    assert source.chat_template == TEMPLATE


@pytest.fixture
def exported(tmp_path):
    config = tiny_config(vocab=256)
    return write_hf(tmp_path / "m", config, random_tensors(config).items(), ByteTokenizer(), max_shard_bytes=20_000)


def test_non_llama_config_is_refused(exported):
    data = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(
        json.dumps({**data, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(SctError, match=r"config\.json: model type 'gpt2' is not supported"):
        read_hf(exported)


def test_rope_scaling_is_refused(exported):
    data = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**data, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(SctError, match="rope_scaling"):
        read_hf(exported)


def shard_names(directory) -> list[str]:
    return sorted(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()))


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.001])
def test_truncated_shard_is_an_error(exported, keep):
    name = shard_names(exported)[1]
    shard = exported / name
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SctError, match=name):
        read_hf(exported)


def test_missing_files_are_errors(exported, tmp_path):
    with pytest.raises(SctError, match="no such directory"):
        read_hf(tmp_path / "nowhere")
    name = shard_names(exported)[-1]
    (exported / name).unlink()
    with pytest.raises(SctError, match=f"{name}: no such file"):
        read_hf(exported)
    (exported / "model.safetensors.index.json").unlink()
    with pytest.raises(SctError, match="neither model.safetensors nor"):
        read_hf(exported)
    (exported / "config.json").unlink()
    with pytest.raises(SctError, match=r"config\.json: no such file"):
        read_hf(exported)


def test_missing_tensor_names_the_file(exported):
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    kept = {k: v for k, v in load_file(exported / shard).items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(kept, exported / shard)
    with pytest.raises(SctError, match=f"{shard}: missing tensor model.layers.1.mlp.up_proj.weight"):
        read_hf(exported)


def test_write_hf_rejects_bad_tensors_and_leaves_no_partial_files(tmp_path):
    config = tiny_config(vocab=256)
    tensors = random_tensors(config)
    cases = [
        ({**tensors, "layers.0.attn.q.weight": torch.zeros(3, 3)}, "has shape"),
        ({**tensors, "layers.0.attn.q.U": torch.zeros(32, 4)}, "dense names expected"),
        ({n: t for n, t in tensors.items() if n != "norm.weight"}, "norm.weight was not given"),
    ]
    for i, (given, message) in enumerate(cases):
        out = tmp_path / f"m{i}"
        with pytest.raises(SctError, match=message):
            write_hf(out, config, given.items(), ByteTokenizer(), max_shard_bytes=20_000)
        assert not list(out.iterdir())
