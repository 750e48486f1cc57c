"""Block memos: what a block's first forward records is what its recompute would compute, so replaying it
changes nothing (exact against autograd, equal bit for bit to recomputing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sct_edge.model import accounting
from sct_edge.model.config import RankPolicy, get_preset
from sct_edge.model.memo import BlockMemo, MemoArena, ReplayedAttention, causal_attention
from sct_edge.model.spectral import SharedInputProjections
from sct_edge.model.transformer import Block, rope_tables
from tests.test_swiglu import factors, sliced


def qkv(dtype=torch.float64, heads: int = 4, kv_heads: int = 2, seq: int = 6, head_dim: int = 8):
    g = torch.Generator().manual_seed(0)
    shapes = ((2, heads, seq, head_dim), (2, kv_heads, seq, head_dim), (2, kv_heads, seq, head_dim))
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def recorded_then_replayed(q, k, v):
    """Causal attention as a recompute computes it: recorded under no_grad, then replayed with grad."""
    memo = BlockMemo()
    with torch.no_grad():
        causal_attention(q, k, v, memo)
    return causal_attention(q, k, v, memo)


def test_replayed_attention_gradcheck_in_float64_with_grouped_kv_heads():
    assert torch.autograd.gradcheck(recorded_then_replayed, qkv())


def test_replayed_attention_equals_sdpa_and_its_gradients_bit_for_bit():
    q, k, v = qkv(torch.float32)
    grad = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    got = recorded_then_replayed(q, k, v)
    assert got.grad_fn is not None and got.grad_fn.name().startswith("ReplayedAttention")
    assert torch.equal(got, expected)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), expected_grads, strict=True):
        assert torch.equal(a, b)


def test_a_replayed_memo_serves_a_second_backward_unchanged():
    """A measuring backward pass (clipping) and the updating one replay the same memo."""
    q, k, v = qkv(torch.float32)
    memo = BlockMemo()
    with torch.no_grad():
        causal_attention(q, k, v, memo)
    out, lse = (t.clone() for t in memo.attention)
    first = torch.autograd.grad(causal_attention(q, k, v, memo).sum(), (q, k, v))
    second = torch.autograd.grad(causal_attention(q, k, v, memo).sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.equal(memo.attention[0], out) and torch.equal(memo.attention[1], lse)
    assert not memo.attention[0].requires_grad and memo.attention[0].grad_fn is None
    assert ReplayedAttention.apply(q, k, v, *memo.attention).requires_grad


def test_replayed_swiglu_gradcheck_in_float64():
    def recorded_then_replayed_mlp(*args):
        memo = BlockMemo()
        with torch.no_grad():
            sliced(*args, chunk=4, memo=memo)
        assert memo.mlp is not None
        return sliced(*args, chunk=4, memo=memo)

    assert torch.autograd.gradcheck(recorded_then_replayed_mlp, factors(tokens=7, dim=5, ffn=11, rank=3))


@pytest.mark.parametrize("autocast", [False, True])  # bfloat16 compute: products and attention in bfloat16
@pytest.mark.parametrize("arena", [False, True])
@pytest.mark.parametrize("sliced", [False, True])
def test_a_block_recomputed_from_its_memo_equals_a_plain_recompute_bit_for_bit(monkeypatch, sliced, arena,
                                                                                autocast):
    if sliced:
        monkeypatch.setattr(accounting, "SLICE_FROM_BYTES", 1)  # every size: the MLP in FFN slices
    config = get_preset("tiny").with_ranks(RankPolicy.uniform(4))
    block = Block(config, layer=0, seed=3)
    x = torch.randn(2, 9, config.dim, generator=torch.Generator().manual_seed(4))
    grad = torch.randn_like(x)
    cos, sin = rope_tables(config, torch.arange(9))

    def compute():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)

    def recompute(memo):
        block.zero_grad(set_to_none=True)
        h = x.clone().requires_grad_()
        with compute():
            y = block(h, cos, sin, None, memo)
        y.backward(grad)
        return [y.detach(), h.grad] + [p.grad for p in block.parameters()]

    memo = BlockMemo(arena=MemoArena(1 << 20) if arena else None)
    with torch.no_grad(), compute():
        first = block(x, cos, sin, None, memo)
    assert (memo.attention[0].dtype == torch.bfloat16) == autocast
    assert memo.attention is not None and (memo.mlp is not None) == sliced
    assert len(memo.qkv_in) == 3 and len(memo.o_in) == 1
    if arena:  # every recorded tensor lives in the arena's buffer
        recorded = [*memo.attention, *memo.qkv_in, *memo.o_in, *(memo.mlp or ())]
        assert all(t.untyped_storage().data_ptr() == memo.arena.buffer.data_ptr() for t in recorded)
    plain = recompute(None)
    replayed = recompute(memo)
    assert torch.equal(first, plain[0])
    for a, b in zip(replayed, plain, strict=True):
        assert torch.equal(a, b)


def test_replayed_projections_gradcheck_in_float64():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    factors_ = [torch.randn(6, k, generator=g, dtype=torch.float64, requires_grad=True) for k in (4, 2, 3)]

    def recorded_then_replayed_projections(x, *us):
        with torch.no_grad():
            recorded = tuple(t.clone() for t in SharedInputProjections.apply(x, None, *us))
        return SharedInputProjections.apply(x, recorded, *us)

    assert torch.autograd.gradcheck(recorded_then_replayed_projections, (x, *factors_))
    assert torch.autograd.gradcheck(lambda x, *us: SharedInputProjections.apply(x, None, *us), (x, *factors_))


def test_the_arena_keeps_strides_aligns_each_tensor_and_falls_back_when_full():
    arena = MemoArena(4096)
    permuted = torch.arange(24, dtype=torch.float32).view(2, 3, 4).transpose(0, 1)  # dense, not contiguous
    kept = arena.keep(permuted)
    assert torch.equal(kept, permuted) and kept.stride() == permuted.stride()
    odd = arena.keep(torch.ones(3, dtype=torch.bfloat16))
    assert odd.data_ptr() - arena.buffer.data_ptr() == 128  # 96 bytes in, the next cache line
    too_big = torch.ones(2048)
    spilled = arena.keep(too_big)
    assert torch.equal(spilled, too_big) and spilled.untyped_storage().data_ptr() != arena.buffer.data_ptr()
    arena.reset()
    assert arena.keep(permuted).data_ptr() == kept.data_ptr()  # the next step reuses the same memory
