"""Import (Hugging Face directories, GGUF files) into spectral stores and export back to Hugging Face layout.

The reference everywhere is an independent dense LLaMA forward written here from the Hugging Face
definition (float64, Hugging Face tensor names), so an import is checked against what the checkpoint means,
not against sct-edge's own model code.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_gguf_reader import random_weights, write_gguf
from test_gguf_reader import tiny_config as gguf_tiny_config

from sct_edge.cli import main
from sct_edge.convert import exporter
from sct_edge.convert.exporter import export_store, in_memory_model
from sct_edge.convert.hf_checkpoint import hf_name, read_hf
from sct_edge.convert.importer import ImportPolicy, factorize, first_layers, import_model, open_source, randomized_svd
from sct_edge.convert.source_model import expected_shapes
from sct_edge.convert.tokenizer import BPETokenizer, tokenizer_from_json
from sct_edge.errors import SctError
from sct_edge.events import StepEvent, read_events
from sct_edge.model.config import ModelConfig
from sct_edge.store.store import Store

gguf = pytest.importorskip("gguf")

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = "The capital of France is Paris. Numbers like 2024 are split into digits."


# ------------------------------------------------------------------------------------- reference model


def reference_logits(weights: dict[str, torch.Tensor], hf_config: dict, ids: list[int]) -> torch.Tensor:
    """Hugging Face LlamaForCausalLM's forward, from its definition, in float64 (T x vocab)."""
    w = {k: v.to(torch.float64) for k, v in weights.items()}
    d, n_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    n_kv, eps = hf_config["num_key_value_heads"], hf_config["rms_norm_eps"]
    hd = d // n_heads
    t = len(ids)

    def rms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    inv_freq = 1.0 / hf_config["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x: torch.Tensor) -> torch.Tensor:  # x: heads x T x hd, rotate_half
        return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    h = w["model.embed_tokens.weight"][torch.tensor(ids)]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(hf_config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = rope((x @ w[p + "self_attn.q_proj.weight"].T).view(t, n_heads, hd).transpose(0, 1))
        k = rope((x @ w[p + "self_attn.k_proj.weight"].T).view(t, n_kv, hd).transpose(0, 1))
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(t, n_kv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(n_heads // n_kv, 0), v.repeat_interleave(n_heads // n_kv, 0)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ v
        h = h + attn.transpose(0, 1).reshape(t, d) @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    h = rms(h, w["model.norm.weight"])
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    return h @ head.T


def hf_json(config: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def store_logits(path, ids: list[int]) -> torch.Tensor:
    with Store.open(path) as store, torch.no_grad():
        return in_memory_model(store)(torch.tensor([ids]))[0].double()


# ----------------------------------------------------------------------------------- source fixtures


def hf_config(vocab: int, tied: bool = False) -> ModelConfig:
    return ModelConfig(
        name="tiny", vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
        max_seq_len=64, rope_theta=20000.0, norm_eps=1e-6, tie_embeddings=tied,
    )  # fmt: skip


def hf_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in Hugging Face naming: matrices N(0, 0.1^2), norms around 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        scale, base = (0.1, 1.0) if len(shape) == 1 else (0.15, 0.0)
        out[hf_name(name)] = base + scale * torch.randn(shape, generator=g)
    return out


def write_hf_dir(directory, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer) -> dict:
    """A sharded checkpoint as transformers' save_pretrained lays it out, written with safetensors itself."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(weights)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, keys in files.items():
        save_file({k: weights[k].contiguous() for k in keys}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    data = hf_json(config)
    (directory / "config.json").write_text(json.dumps(data))
    (directory / "tokenizer.json").write_text(tokenizer.to_str())
    tok_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return data


@pytest.fixture
def hf_model(tmp_path, toy_bpe):
    config = hf_config(toy_bpe.get_vocab_size())
    weights = hf_weights(config)
    data = write_hf_dir(tmp_path / "hf-model", config, weights, toy_bpe)
    return tmp_path / "hf-model", weights, data


# ------------------------------------------------------------------------------------------------ SVD


def decaying(n_out: int, n_in: int, rate: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(n_out, n_out, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))[0]
    k = min(n_out, n_in)
    sigma = rate ** torch.arange(k, dtype=torch.float64)
    return ((a[:, :k] * sigma) @ b[:, :k].T).float()


def test_randomized_svd_matches_the_exact_one_on_a_decaying_spectrum():
    w = decaying(300, 200, 0.85)
    exact = factorize(w, rank=12, randomized=False)
    fast = factorize(w, rank=12, randomized=True)
    assert (exact.method, fast.method) == ("full", "randomized")
    torch.testing.assert_close(fast.s, exact.s, rtol=1e-5, atol=0)
    dense_exact = (exact.V * exact.s) @ exact.U.T
    dense_fast = (fast.V * fast.s) @ fast.U.T
    assert (dense_fast - dense_exact).norm() / w.norm() < 1e-5
    assert fast.kept_energy == pytest.approx(exact.kept_energy, abs=1e-9)
    for f in (exact, fast):
        eye = torch.eye(12)
        assert (f.U.T @ f.U - eye).abs().max() < 1e-5 and (f.V.T @ f.V - eye).abs().max() < 1e-5
    # the randomized path is the one the thresholds pick for a rank far below the matrix size
    assert factorize(decaying(600, 600, 0.97), rank=20).method == "randomized"
    assert factorize(decaying(60, 60, 0.9), rank=20).method == "full"


def test_reported_error_is_the_true_reconstruction_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(80, 50, generator=g)
    for f in (factorize(w, rank=7, randomized=False), factorize(w, rank=7, randomized=True)):
        true = ((w.double() - (f.V.double() * f.s.double()) @ f.U.double().T).norm() / w.double().norm()).item()
        assert f.rel_error == pytest.approx(true, rel=1e-5)
        assert f.kept_energy == pytest.approx(1 - true**2, rel=1e-6)
    full = factorize(w, rank=50)
    assert full.kept_energy == pytest.approx(1.0, abs=1e-12) and full.rel_error < 1e-6


def test_energy_target_without_the_full_spectrum():
    w = decaying(400, 300, 0.9)
    exact = factorize(w, energy=0.99, randomized=False)
    fast = factorize(w, energy=0.99, randomized=True)
    assert fast.method == "randomized" and exact.method == "full"
    assert fast.kept_energy >= 0.99 and exact.kept_energy >= 0.99
    assert exact.rank <= fast.rank <= exact.rank + 1
    # the smallest such rank: one fewer misses the target
    assert factorize(w, rank=exact.rank - 1, randomized=False).kept_energy < 0.99
    a, s, b = randomized_svd(w, 30)
    assert a.shape == (300, 30) and b.shape == (400, 30) and bool((s[:-1] >= s[1:]).all())


def test_factorize_rejects_bad_ranks_and_energies():
    w = torch.randn(10, 6)
    with pytest.raises(SctError, match=r"rank 7 is outside 1\.\.6 for a 10 x 6 matrix"):
        factorize(w, rank=7)
    with pytest.raises(SctError, match="energy must be in"):
        factorize(w, energy=1.5)
    zero = factorize(torch.zeros(10, 6), energy=0.9)
    assert zero.rank == 1 and zero.kept_energy == 1.0 and zero.rel_error == 0.0


# ---------------------------------------------------------------------------------------- HF import


def test_sharded_hf_import_at_full_rank_gives_the_reference_logits(tmp_path, hf_model, toy_bpe):
    directory, weights, data = hf_model
    result = import_model(directory, tmp_path / "store", ImportPolicy(full_rank=True))
    ids = toy_bpe.encode(TEXT).ids
    reference = reference_logits(weights, data, ids)
    logits = store_logits(tmp_path / "store", ids)
    assert (logits - reference).abs().max() < 1e-4 * reference.abs().max()

    with Store.open(tmp_path / "store") as store:
        config = store.config
        report = store.extra["import_report"]
        assert store.extra["chat_template"] == TEMPLATE
        tokenizer = tokenizer_from_json(store.tokenizer_json())
    assert isinstance(tokenizer, BPETokenizer) and tokenizer.encode(TEXT) == ids
    assert (tokenizer.bos_id, tokenizer.eos_id) == (
        toy_bpe.token_to_id("<|im_start|>"),
        toy_bpe.token_to_id("<|im_end|>"),
    )
    # every matrix, embedding and head included, at min(in, out), and reported as kept whole
    assert [row["matrix"] for row in report] == ["embed"] + [
        f"layers.{i}.{m}" for i in range(2) for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up",
                                                      "mlp.down")
    ] + ["head"]  # fmt: skip
    for row in report:
        assert row["rank"] == min(row["shape"]) and row["kept_energy"] == pytest.approx(1.0, abs=1e-9)
        assert row["rel_error"] < 1e-6
    assert report[0]["shape"] == [32, data["vocab_size"]] and report[-1]["shape"] == [data["vocab_size"], 32]
    assert config.ranks.overrides["layers.1.attn.k"] == 16 and config.ranks.overrides["embed"] == 32
    assert config.name == "hf-model" and result.config == config


def test_energy_import_records_each_matrix_rank(tmp_path, hf_model):
    directory, weights, _ = hf_model
    policy = ImportPolicy(energy=0.9, components={"attn": 6, "embed": "energy"})
    import_model(directory, tmp_path / "store", policy)
    with Store.open(tmp_path / "store") as store:
        ranks = store.config.ranks
        report = {row["matrix"]: row for row in store.extra["import_report"]}
        specs = store.specs("block.001")
    assert ranks.energy == 0.9 and ranks.attn == 6 and ranks.head is None
    assert "head" not in report and "layers.0.attn.q" not in ranks.overrides
    for path in ["embed", "layers.0.mlp.gate", "layers.1.mlp.down"]:
        row = report[path]
        assert ranks.overrides[path] == row["rank"] < min(row["shape"])
        assert row["kept_energy"] >= 0.9
        w = weights[hf_name(path + ".weight")] if path != "embed" else weights["model.embed_tokens.weight"].T
        sigma = torch.linalg.svdvals(w.double())
        kept = (sigma**2).cumsum(0) / (sigma**2).sum()
        assert row["rank"] == int((kept < 0.9 - 1e-12).sum()) + 1  # the smallest rank reaching 0.9
    assert report["layers.0.attn.q"]["rank"] == 6 and report["layers.0.attn.q"]["kept_energy"] < 0.9
    assert specs["mlp.up.U"][1] == (32, ranks.overrides["layers.1.mlp.up"])
    assert ranks.mlp == max(ranks.overrides[f"layers.{i}.mlp.{m}"] for i in range(2) for m in ("gate", "up", "down"))


# -------------------------------------------------------------------------------------- GGUF import


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
def test_gguf_import_gives_the_dense_forward_of_the_file(tmp_path, toy_bpe_vocab, qtype):
    config = gguf_tiny_config(dim=64, tied=qtype == "Q4_1")
    path = write_gguf(
        tmp_path / "m.gguf", config, random_weights(config), toy_bpe_vocab, qtype=gguf.GGMLQuantizationType[qtype]
    )
    import_model(path, tmp_path / "store", ImportPolicy(full_rank=True))
    source = open_source(path)
    dense = {hf_name(name): tensor for name, tensor in source.tensors()}  # dequantised, as llama.cpp reads them
    ids = source.tokenizer.encode(TEXT)
    reference = reference_logits(dense, hf_json(source.config), ids)
    logits = store_logits(tmp_path / "store", ids)
    assert (logits - reference).abs().max() < 1e-4 * reference.abs().max()
    with Store.open(tmp_path / "store") as store:
        assert store.extra["chat_template"] == TEMPLATE
        assert store.extra["imported_from"]["format"] == "gguf"
        assert tokenizer_from_json(store.tokenizer_json()).encode(TEXT) == ids


def test_a_model_of_the_first_layers(tmp_path, hf_model):
    directory, weights, data = hf_model
    source = first_layers(open_source(directory), 1)
    import_model(source, tmp_path / "store", ImportPolicy(full_rank=True))
    ids = [5, 9, 17, 3]
    reference = reference_logits(weights, {**data, "num_hidden_layers": 1}, ids)
    assert (store_logits(tmp_path / "store", ids) - reference).abs().max() < 1e-4 * reference.abs().max()
    with pytest.raises(SctError, match="layers must be in 1..2"):
        first_layers(open_source(directory), 3)


# ------------------------------------------------------------------------------------------- export


def test_export_then_import_at_full_rank_reproduces_the_store(tmp_path, hf_model):
    directory, weights, data = hf_model
    policy = ImportPolicy(rank=4, components={"embed": 8, "head": "full"})
    import_model(directory, tmp_path / "store", policy)
    result = export_store(tmp_path / "store", tmp_path / "out", max_shard_bytes=40_000)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= set(
        result.files
    )
    exported_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported_config["architectures"] == ["LlamaForCausalLM"] and exported_config["num_key_value_heads"] == 2
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE

    # the exported weights, read with safetensors alone, give the store's logits under the reference forward
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    exported = {}
    for file in sorted(set(index["weight_map"].values())):
        exported.update(load_file(tmp_path / "out" / file))
    ids = [1, 7, 42, 99, 3, 250]
    store_out = store_logits(tmp_path / "store", ids)
    reference = reference_logits(exported, exported_config, ids)
    assert (store_out - reference).abs().max() < 1e-4 * reference.abs().max()
    # a rank-4 matrix exports as a rank-4 dense matrix
    assert torch.linalg.matrix_rank(exported["model.layers.0.mlp.up_proj.weight"].double(), rtol=1e-6) == 4

    import_model(tmp_path / "out", tmp_path / "again", ImportPolicy(full_rank=True))
    assert (store_logits(tmp_path / "again", ids) - store_out).abs().max() < 1e-4 * store_out.abs().max()
    with Store.open(tmp_path / "store") as a, Store.open(tmp_path / "again") as b:
        assert a.extra["chat_template"] == b.extra["chat_template"]
        assert a.tokenizer_json() == b.tokenizer_json()
        first, second = a.read("block.001"), b.read("block.001")
        for key in ("attn.v", "mlp.down"):
            dense_a = (first[f"{key}.V"] * first[f"{key}.s"]) @ first[f"{key}.U"].T
            dense_b = (second[f"{key}.V"] * second[f"{key}.s"]) @ second[f"{key}.U"].T
            torch.testing.assert_close(dense_b, dense_a, atol=1e-5, rtol=0)
        assert torch.equal(first["mlp_norm.weight"], second["mlp_norm.weight"])


def test_export_in_half_precision_and_refusals(tmp_path, hf_model):
    directory, _, _ = hf_model
    import_model(directory, tmp_path / "store", ImportPolicy(rank=4))
    export_store(tmp_path / "store", tmp_path / "bf16", dtype="bfloat16")
    assert load_file(tmp_path / "bf16" / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    assert read_hf(tmp_path / "bf16").config.n_layers == 2
    with pytest.raises(SctError, match="must not be the store itself"):
        export_store(tmp_path / "store", tmp_path / "store")
    with pytest.raises(SctError, match="dtype 'int8'"):
        export_store(tmp_path / "store", tmp_path / "x", dtype="int8")


def test_a_failure_part_way_through_an_export_leaves_the_directory_as_it_was(tmp_path, hf_model, monkeypatch):
    directory, _, _ = hf_model
    import_model(directory, tmp_path / "store", ImportPolicy(rank=4))
    real = exporter.dense_tensors

    def fails_after_the_first(store):
        tensors = real(store)
        yield next(tensors)
        raise SctError("disk full (simulated)")

    monkeypatch.setattr(exporter, "dense_tensors", fails_after_the_first)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "README.md").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    for out in ("new", "kept"):
        with pytest.raises(SctError, match="simulated"):
            export_store(tmp_path / "store", tmp_path / out, max_shard_bytes=40_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no "new", no staging directory
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["README.md"]
    monkeypatch.setattr(exporter, "dense_tensors", real)
    result = export_store(tmp_path / "store", tmp_path / "kept", max_shard_bytes=40_000)
    assert "README.md" in result.files and "config.json" in result.files
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---------------------------------------------------------------------------------------- bad input


def test_non_llama_architectures_are_refused_and_leave_nothing(tmp_path, hf_model, toy_bpe_vocab):
    directory, _, data = hf_model
    (directory / "config.json").write_text(json.dumps({**data, "model_type": "mistral", "architectures": []}))
    with pytest.raises(SctError, match=r"config\.json: model type 'mistral' is not supported"):
        import_model(directory, tmp_path / "store", ImportPolicy(rank=4))
    config = gguf_tiny_config()
    path = write_gguf(tmp_path / "q.gguf", config, random_weights(config), toy_bpe_vocab, arch="qwen2")
    with pytest.raises(SctError, match=r"q\.gguf: architecture 'qwen2'"):
        import_model(path, tmp_path / "store", ImportPolicy(rank=4))
    assert not (tmp_path / "store").exists()


def test_unsupported_tensor_type_and_truncated_files(tmp_path, hf_model, toy_bpe_vocab):
    config = gguf_tiny_config()
    weights = random_weights(config)
    raw = {"layers.1.mlp_norm.weight": (torch.ones(config.dim, dtype=torch.int32).numpy(), None)}
    path = write_gguf(tmp_path / "i32.gguf", config, weights, toy_bpe_vocab, raw=raw)
    with pytest.raises(SctError, match=r"blk\.1\.ffn_norm\.weight has type I32"):
        import_model(path, tmp_path / "store", ImportPolicy(rank=4))
    cut = write_gguf(tmp_path / "cut.gguf", config, weights, toy_bpe_vocab)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(SctError, match=r"cut\.gguf"):
        import_model(cut, tmp_path / "store", ImportPolicy(rank=4))
    directory, _, _ = hf_model
    shard = directory / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SctError, match="model-00002-of-00002.safetensors") as error:
        import_model(directory, tmp_path / "store", ImportPolicy(rank=4))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "store").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left either


def test_ranks_above_a_matrix_full_rank_are_capped_with_a_note(tmp_path, hf_model):
    directory, _, _ = hf_model
    result = import_model(directory, tmp_path / "store", ImportPolicy(rank=20, components={"embed": 33}))
    assert result.notes == [
        "rank 33 is above the full rank of 1 embed matrices; they keep their full rank (32 x 300 at 32)",
        "rank 20 is above the full rank of 4 attn matrices; they keep their full rank (16 x 32 at 16)",
    ]
    ranks = {row["matrix"]: row["rank"] for row in result.report}
    assert ranks["layers.0.attn.q"] == 20 and ranks["layers.1.attn.k"] == 16 and ranks["embed"] == 32
    with Store.open(tmp_path / "store") as store:
        policy = store.config.ranks
    assert policy.attn == 20 and policy.rank_of("layers.0.attn.v") == 16 and policy.rank_of("layers.0.attn.o") == 20


def test_policy_errors(tmp_path, hf_model, toy_bpe):
    directory, _, _ = hf_model
    cases = [
        (ImportPolicy(rank=4, energy=0.9), "exactly one of --rank R, --energy E, --params-ratio R, --size SIZE, "),
        (ImportPolicy(), "exactly one of"),
        (ImportPolicy(rank=4, components={"mlp": "energy"}), "--mlp-rank energy needs --energy E"),
        (ImportPolicy(energy=1.2), r"--energy must be in \(0, 1\]"),
    ]
    for policy, message in cases:
        with pytest.raises(SctError, match=message):
            import_model(directory, tmp_path / "store", policy)
    tied = hf_config(toy_bpe.get_vocab_size(), tied=True)
    write_hf_dir(tmp_path / "tied", tied, hf_weights(tied), toy_bpe)
    with pytest.raises(SctError, match="tied to the embedding"):
        import_model(tmp_path / "tied", tmp_path / "store", ImportPolicy(rank=4, components={"head": 4}))
    assert not (tmp_path / "store").exists()


def test_a_failure_while_writing_the_store_removes_it(tmp_path, hf_model):
    """The final norm is read after every matrix was factored, while the store is being written."""
    directory, weights, _ = hf_model
    weights["model.norm.weight"][3] = float("nan")
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    for file in set(index.values()):
        save_file({k: t for k, t in weights.items() if index[k] == file}, directory / file, metadata={"format": "pt"})
    with pytest.raises(SctError, match=r"tensor norm\.weight has non-finite values"):
        import_model(directory, tmp_path / "store", ImportPolicy(rank=4))
    assert not (tmp_path / "store").exists()
    # a directory that existed (empty) before the import is left, empty
    (tmp_path / "mine").mkdir()
    with pytest.raises(SctError, match="non-finite"):
        import_model(directory, tmp_path / "mine", ImportPolicy(rank=4))
    assert list((tmp_path / "mine").iterdir()) == []
    # and a non-empty one is refused untouched
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SctError, match="already exists and is not empty"):
        import_model(directory, tmp_path / "mine", ImportPolicy(rank=4))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------- command line, run


def test_cli_import_export_and_fine_tuning_with_the_model_tokenizer(tmp_path, hf_model, toy_bpe, capsys):
    from conftest import TOY_CORPUS

    directory, _, _ = hf_model
    store = tmp_path / "store"
    assert main(["import", str(directory), str(store), "--energy", "0.95", "--attn-rank", "6", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "imported hf-model from the Hugging Face directory" in out
    assert "attn   rank 6" in out and "mlp    energy 0.95" in out and "embed  dense" in out

    assert main(["import", str(directory), str(tmp_path / "x"), "--params-ratio", "1.5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sct-edge: error: ") and "--params-ratio must be in (0, 1]" in err and "\n" not in err
    assert not (tmp_path / "x").exists()

    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(TOY_CORPUS * 40))
    argv = [
        "run",
        "--store",
        str(store),
        "--data",
        str(data),
        "--steps",
        "2",
        "--profile",
        "ci",
        "--no-tui",
        "--batch",
        "2",
        "--seq",
        "16",
        "--eval-every",
        "0",
        "--lr-spectral",
        "1e-3",
        "--lr-dense",
        "1e-4",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    with Store.open(store) as s:
        assert s.step == 2
    steps = [e for e in read_events(tmp_path / "store.runs" / "events.jsonl") if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == [1, 2]
    assert all(math.isfinite(e.loss) for e in steps)
    # the data was tokenised with the model's own BPE tokenizer, not bytes
    meta = json.loads((tmp_path / "store.tokens" / "meta.json").read_text())
    assert meta["vocab_size"] == toy_bpe.get_vocab_size()
    assert meta["train_tokens"] + meta["val_tokens"] < 0.6 * meta["text_bytes"]  # bytes would give one per byte

    assert main(["export", str(store), str(tmp_path / "out")]) == 0
    assert "exported" in capsys.readouterr().out
    assert read_hf(tmp_path / "out").chat_template == TEMPLATE
