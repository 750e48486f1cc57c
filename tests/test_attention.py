"""Causal attention on the routed products (`sct_edge/model/attention.py`): the flash kernel's values and
gradients, exact against autograd in float64, and the block and its memo take it where it is routed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sct_edge.model import attention, products
from sct_edge.model.config import RankPolicy, get_preset
from sct_edge.model.memo import BlockMemo, causal_attention
from sct_edge.model.rope import rope_tables
from sct_edge.model.transformer import Block

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def qkv(b=2, heads=6, kv_heads=2, t=11, d=8, dtype=torch.float32, seed=0):
    """q, k, v laid out batch × seq × heads × head_dim, as the block's projections give them."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, t, n, d, generator=g, dtype=dtype).transpose(1, 2) for n in (heads, kv_heads, kv_heads))


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 positions, so 11 positions make three blocks, the last one partial."""
    monkeypatch.setattr(attention, "BLOCK_POSITIONS", 4)


@pytest.mark.parametrize("kv_heads", [1, 2, 6])  # all heads on one key/value head, groups of three, no grouping
def test_forward_and_backward_equal_the_flash_kernel(small_blocks, products_route, kv_heads):
    q, k, v = qkv(kv_heads=kv_heads)
    out = attention.forward(q, k, v)
    expected_out, expected_lse = FLASH(q, k, v, 0.0, True)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    assert out.transpose(1, 2).is_contiguous()  # batch × seq × heads × d, as the output projection reads it
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = attention.backward(grad, q, k, v, out)
    expected = FLASH_BACKWARD(grad, q, k, v, expected_out, expected_lse, 0.0, True)
    for a, b, like in zip(got, expected, (q, k, v), strict=True):
        assert a.shape == like.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradcheck_in_float64(small_blocks):
    q, k, v = (t.detach().requires_grad_() for t in qkv(b=1, heads=4, kv_heads=2, t=9, d=3, dtype=torch.float64))
    assert torch.autograd.gradcheck(attention.CausalAttention.apply, (q, k, v))


def test_routed_where_it_pays_only():
    """llama3-8b's heads (4 of 128 per key/value head) from 256 positions; SmolLM2's (3 of 64) never."""
    for heads, kv_heads, d, routed_from in ((32, 8, 128, 256), (9, 3, 64, None)):
        for t in (8, 255, 256, 2048):
            expected = products.uses_onednn() and routed_from is not None and t >= routed_from
            assert attention.routed(torch.empty(1, heads, t, d), kv_heads) == expected, (heads, t)
    q = torch.empty(1, 32, 512, 128)
    assert not attention.routed(q.double(), 8) and not attention.routed(q.bfloat16(), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not attention.routed(q, 8)


@pytest.fixture
def routed_everywhere(small_blocks, monkeypatch):
    if not products.onednn_available():
        pytest.skip("torch's oneDNN has no AVX-512 kernels here")
    monkeypatch.setattr(attention, "MIN_POSITIONS", 0)
    monkeypatch.setattr(attention, "MIN_GROUP_WIDTH", 0)


def test_the_block_and_its_memo_take_the_routed_attention(routed_everywhere):
    """A block's attention equals SDPA's where routed, and a memo records and replays the same kernel: the
    recompute's output and gradients equal the block's own bit for bit."""
    config = get_preset("tiny").with_ranks(RankPolicy.uniform(4))
    config.n_kv_heads = config.n_heads // 2
    block = Block(config, layer=0, seed=1)
    x = torch.randn(2, 11, config.dim, generator=torch.Generator().manual_seed(2))
    cos, sin = rope_tables(config, torch.arange(11))
    q, k, v = qkv(b=2, heads=config.n_heads, kv_heads=config.n_kv_heads, t=11, d=config.head_dim)
    torch.testing.assert_close(attention.CausalAttention.apply(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               rtol=1e-5, atol=1e-6)

    def output_and_gradients(memo):
        block.zero_grad(set_to_none=True)
        h = x.clone().requires_grad_()
        y = block(h, cos, sin, memo=memo)
        y.backward(torch.ones_like(y))
        return [y.detach(), h.grad] + [p.grad for p in block.parameters()]

    with torch.profiler.profile() as prof:
        plain = output_and_gradients(None)
    names = {e.key for e in prof.key_averages()}
    assert "CausalAttentionBackward" in names and not any("flash_attention" in n for n in names)
    memo = BlockMemo()
    with torch.no_grad():
        block(x, cos, sin, memo=memo)  # the first forward records
    replayed = output_and_gradients(memo)
    for a, b in zip(plain, replayed, strict=True):
        assert torch.equal(a, b)
    q, k, v = (t.detach().requires_grad_() for t in qkv(heads=4, kv_heads=2))
    memo = BlockMemo()
    first = causal_attention(q, k, v, memo)
    assert torch.equal(first, attention.forward(q, k, v)) and memo.attention[1] is None  # no log-sum-exp


def test_a_memo_recorded_with_grad_on_still_backpropagates(routed_everywhere, products_route):
    """The flash op the memo calls otherwise is differentiable; the routed kernel must be too."""
    q, k, v = (t.detach().requires_grad_() for t in qkv(heads=4, kv_heads=2))
    out = causal_attention(q, k, v, BlockMemo())
    assert out.grad_fn is not None
    out.sum().backward()
    expected = [t.detach().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*expected, is_causal=True, enable_gqa=True).sum().backward()
    for got, want in zip((q, k, v), expected, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
