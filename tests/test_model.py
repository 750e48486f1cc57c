"""The LLaMA-family model in spectral and dense modes on tiny shapes."""

import pytest
import torch
from torch.func import functional_call

from sct_edge.model.config import ModelConfig, RankPolicy, get_preset
from sct_edge.model.transformer import Block, KVCache, Transformer, rope_tables


def small_config(**overrides) -> ModelConfig:
    base = dict(name="t", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32,
                ranks=RankPolicy(attn=4, mlp=6, embed=5, head=7))
    base.update(overrides)
    return ModelConfig(**base)


@pytest.mark.parametrize("spectral", [True, False])
@pytest.mark.parametrize("config", [get_preset("tiny"), small_config(), small_config(tie_embeddings=True),
                                    small_config(n_kv_heads=4), small_config(n_kv_heads=1)])
def test_forward_backward(config, spectral):
    torch.manual_seed(0)
    model = Transformer(config, spectral=spectral)
    tokens = torch.randint(0, config.vocab_size, (2, 10))
    logits = model(tokens)
    assert logits.shape == (2, 10, config.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if spectral:
        assert any(n.endswith(".U") for n, _ in model.named_parameters())
    else:
        assert not any(n.endswith((".U", ".s", ".V")) for n, _ in model.named_parameters())


@pytest.mark.parametrize("spectral", [True, False])
def test_causal_mask_holds(spectral):
    config = small_config()
    model = Transformer(config, spectral=spectral).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gqa_matches_repeated_kv_heads():
    """Grouped KV heads give the same result as the equivalent full multi-head model with repeated k/v."""
    gqa_config = small_config(n_kv_heads=2, ranks=RankPolicy(attn=None, mlp=None, embed=None, head=None))
    mha_config = small_config(n_kv_heads=4, ranks=RankPolicy(attn=None, mlp=None, embed=None, head=None))
    gqa, mha = Transformer(gqa_config), Transformer(mha_config)
    state = gqa.state_dict()
    head_dim = gqa_config.head_dim
    for i in range(gqa_config.n_layers):
        for m in ("k", "v"):
            w = state[f"layers.{i}.attn.{m}.weight"].view(2, head_dim, -1)
            state[f"layers.{i}.attn.{m}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_block_runs_with_parameters_supplied_from_outside():
    """The scheduler's way: a meta-device block plus external tensors computes what the real block computes."""
    config = small_config()
    model = Transformer(config, seed=3)
    template = Block(config, 1, device="meta")
    params = {k.removeprefix("layers.1."): v for k, v in model.state_dict().items() if k.startswith("layers.1.")}
    x = torch.randn(2, 5, config.dim)
    cos, sin = rope_tables(config, torch.arange(5))
    with torch.no_grad():
        torch.testing.assert_close(functional_call(template, params, (x, cos, sin)), model.layers[1](x, cos, sin))
    # A block built alone with the same seed is the model's block.
    alone = Block(config, 1, seed=3).state_dict()
    for k, v in alone.items():
        assert torch.equal(v, params[k]), k


def test_kv_cache_decoding_matches_full_forward():
    config = small_config()
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 11))
    caches = [KVCache() for _ in range(config.n_layers)]
    with torch.no_grad():
        full = model(tokens)
        prefix = model(tokens[:, :6], caches=caches)
        steps = [model(tokens[:, i : i + 1], start_pos=i, caches=caches) for i in range(6, 11)]
    torch.testing.assert_close(prefix, full[:, :6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:], rtol=1e-5, atol=1e-5)


def test_additive_attention_is_o_of_q_plus_k_plus_v():
    config = small_config(attention="additive", n_kv_heads=4)
    block = Block(config, 0)
    x = torch.randn(1, 3, config.dim)
    cos, sin = rope_tables(config, torch.arange(3))
    a = block.attn
    n = block.attn_norm(x)
    h = x + a.o(a.q(n) + a.k(n) + a.v(n))
    expected = h + block.mlp(block.mlp_norm(h))
    torch.testing.assert_close(block(x, cos, sin), expected)


def test_stores_written_before_the_rename_open_with_additive_attention():
    data = small_config(attention="additive", n_kv_heads=4).to_dict()
    assert ModelConfig.from_dict({**data, "attention": "seed"}).attention == "additive"


def test_spectral_init_matches_dense_output_scale():
    """s = sqrt(out/k) gives spectral layers the output scale of the dense init, so both train from scratch."""
    config = get_preset("tiny")
    tokens = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        spectral = Transformer(config)(tokens).std()
        dense = Transformer(config, spectral=False)(tokens).std()
    assert 0.5 < (spectral / dense).item() < 2.0


@pytest.mark.parametrize("autocast", [False, True])
def test_the_fused_attention_path_equals_calling_its_modules(autocast, products_route):
    """q, k, v through `SharedInputProjections` and o with the residual folded in give what calling the four
    modules and adding gives (a forward hook on q makes the block call them, as calibration's hooks do), on
    either route of the products."""
    config = small_config()
    block = Block(config, layer=0, seed=1)
    x = torch.randn(2, 7, config.dim, generator=torch.Generator().manual_seed(2))
    grad = torch.randn_like(x)
    cos, sin = rope_tables(config, torch.arange(7))

    def output_and_gradients():
        block.zero_grad(set_to_none=True)
        h = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = block(h, cos, sin)
        y.backward(grad)
        return [y.detach(), h.grad] + [p.grad for p in block.parameters()]

    fused = output_and_gradients()
    calls = []
    hook = block.attn.q.register_forward_hook(lambda *_: calls.append(1))
    called = output_and_gradients()
    hook.remove()
    assert calls == [1]  # the hooked path did call q
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(fused, called, strict=True):
        torch.testing.assert_close(a, b, **tolerance)
