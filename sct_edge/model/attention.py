"""Causal self-attention whose products take the CPU's own GEMM, for the float32 steps that route to oneDNN.

torch's CPU flash-attention kernel (`F.scaled_dot_product_attention`) does its products with torch's BLAS,
MKL, which runs AVX2 code on AMD CPUs: on llama3-8b r128 at 4 × 512, once the step's other products ran on
oneDNN, the kernel and its backward took 12.1 of 39.8 s of a step's CPU time, at 70–85 GFLOP/s counting the
causal half only. Here each group of query heads that share a key/value head is one tall matrix (positions ×
heads in its rows), taken a block of `BLOCK_POSITIONS` positions at a time against the keys up to the block's
end, so the products skip most of the masked half and run on `sct_edge/model/products.py`'s `linear`; the
softmax of a block is a few passes over a cache-sized tile.

`forward` returns the output (batch × heads × seq × head_dim, laid out batch × seq × heads × head_dim like
the flash kernel's); `backward` takes it back with the output's gradient. `CausalAttention` wraps them for
autograd; `sct_edge/model/memo.py` records the output and replays it. Backward recomputes each block's
probabilities (one product and the same softmax as forward) rather than keeping them. torch's softmax kernel
takes a block of scores in less time than its `exp_` alone (81 against 171 µs for 512 × 512), so no pass
computes a log-sum-exp as the flash kernel does: forward 1.35x and backward 1.26x faster at 4 × 512 (1.15x and
0.97x at 4 × 2048) than max, exp and sum passes with the log-sum-exp kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sct_edge.model.products import linear, uses_onednn

# Query positions per block: with 4 query heads per key/value head, 512 rows a product; the masked half of
# the scores is skipped to within half a block. 64 and 256 were slower at llama3-8b's heads and 512 positions
# (forward + backward 1.4x and 1.5x the flash kernel's speed, against 1.7x at 128).
BLOCK_POSITIONS = 128
# Where it pays, measured forward + backward against the flash kernel (2 threads): llama3-8b's heads (4 query
# heads of 128 per key/value head) 0.90x at 128 positions, 1.13-1.24x at 256, 1.9x at 512; SmolLM2's (3 of 64)
# 0.69x at 256, 1.12x at 512; 16 heads of 64 without grouping 0.39-0.78x up to 1,024. Narrower groups' products
# are too thin for the Python loop over blocks and the extra passes over the scores to pay.
MIN_POSITIONS = 256
MIN_GROUP_WIDTH = 256  # query heads per key/value head × head_dim


def routed(q: Tensor, kv_heads: int) -> bool:
    """Whether causal attention of q (batch × heads × seq × head_dim) runs here rather than in torch's flash
    kernel: float32 on the CPU with oneDNN's products, at the sizes where that pays (see MIN_POSITIONS)."""
    group_width = q.shape[1] // kv_heads * q.shape[3]
    return (uses_onednn() and q.device.type == "cpu" and q.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and q.shape[2] >= MIN_POSITIONS and group_width >= MIN_GROUP_WIDTH)


def _blocks(b: int, kv_heads: int, group: int, t: int):
    """(sequence, key/value head, its query heads, first position, end position) of every block of queries."""
    for i in range(b):
        for g in range(kv_heads):
            for p0 in range(0, t, BLOCK_POSITIONS):
                yield i, g, slice(g * group, (g + 1) * group), p0, min(p0 + BLOCK_POSITIONS, t)


def _future(device: torch.device) -> Tensor:
    """A block's additive mask of later keys (block × 1 × block: -inf above the diagonal, 0 elsewhere); a last,
    shorter block of n positions takes its leading n × 1 × n corner. Added to the scores' diagonal block rather
    than written with `masked_fill_`: on that strided view `add_` took 8.6 µs where `masked_fill_` took 51 (a
    block of 128 positions × 4 heads against 512 keys, 2 threads)."""
    return torch.full((BLOCK_POSITIONS, BLOCK_POSITIONS), -math.inf, device=device).triu_(1).unsqueeze(1)


def _causal_scores(q_block: Tensor, k_scaled: Tensor, p0: int, p1: int, group: int, future: Tensor) -> Tensor:
    """The scores of a block's queries (rows (p0..p1) × group) against keys 0..p1 (already scaled by 1/sqrt(d)),
    the future at -inf."""
    s = linear(q_block, k_scaled[:p1])
    n = p1 - p0
    s.view(n, group, p1)[:, :, p0:].add_(future[:n, :, :n])
    return s


def _scaled_rows(k: Tensor, scale: float) -> Tensor:
    """scale · k, each head's rows contiguous: the softmax's scale taken once on the keys, not on every block of
    scores (q (s k)ᵀ rounds differently from s (q kᵀ), within float32 rounding)."""
    return torch.mul(k.detach(), scale, out=k.new_empty(k.shape))


def _rows(x: Tensor, i: int, heads: slice, p0: int, p1: int) -> Tensor:
    """Positions p0..p1 of sequence i and `heads` of x (batch × heads × seq × d) as rows (position, head) × d:
    runs of heads · d floats when x is laid out batch × seq × heads × d, as q, the output and its gradient are."""
    return x.transpose(1, 2)[i, p0:p1, heads].reshape(-1, x.shape[-1])


def _by_position(b: int, t: int, heads: int, d: int, like: Tensor) -> Tensor:
    """An empty batch × heads × seq × d tensor laid out batch × seq × heads × d, like the flash kernel's output."""
    return torch.empty(b, t, heads, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax(q kᵀ / sqrt(d)) v for q (batch × heads × seq × d) and k, v (batch × kv_heads × seq × d),
    heads a multiple of kv_heads: the output, laid out batch × seq × heads × d (see the module)."""
    b, h, t, d = q.shape
    kv_heads, group, scale = k.shape[1], h // k.shape[1], 1.0 / math.sqrt(d)
    k, v = _scaled_rows(k, scale), v.contiguous()  # each head's keys and values row-major
    out, future = _by_position(b, t, h, d, q), _future(q.device)
    for i, g, heads, p0, p1 in _blocks(b, kv_heads, group, t):
        s = _causal_scores(_rows(q, i, heads, p0, p1), k[i, g], p0, p1, group, future)
        out.transpose(1, 2)[i, p0:p1, heads] = linear(torch.softmax(s, 1), v[i, g, :p1].T).view(p1 - p0, group, d)
    return out


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> tuple[Tensor, ...]:
    """The gradients of q, k and v given the output's, from what `forward` returned."""
    b, h, t, d = q.shape
    kv_heads, group, scale = k.shape[1], h // k.shape[1], 1.0 / math.sqrt(d)
    k, v = _scaled_rows(k, scale), v.contiguous()
    grad_q, future = _by_position(b, t, h, d, q), _future(q.device)
    grad_k, grad_v = (_by_position(b, t, kv_heads, d, k) for _ in range(2))
    # What the softmax's backward takes off each row, grad_out · out, for all rows in one batched product (1.8
    # ms at llama3-8b's 4 × 512, where a multiply and a sum per block, each on a copy of its rows, took ~7).
    delta = torch.bmm(grad_out.transpose(1, 2).reshape(-1, 1, d), out.transpose(1, 2).reshape(-1, d, 1)).view(b, t, h)
    # One key/value head's gradients, transposed (d × t), summed over its query blocks (which `_blocks` gives
    # in order, first to last): each block's sum is the rows' leading columns, contiguous runs, and its product
    # needs no transposed copy of the scores. Summed into strided views of grad_k and grad_v instead, the
    # backward took 161 ms rather than 132 alone at llama3-8b's heads and 4 × 512.
    grad_k_t, grad_v_t = (q.new_empty(d, t) for _ in range(2))
    for i, g, heads, p0, p1 in _blocks(b, kv_heads, group, t):
        if p0 == 0:
            grad_k_t.zero_()
            grad_v_t.zero_()
        q_block, grad_o = _rows(q, i, heads, p0, p1), _rows(grad_out, i, heads, p0, p1)
        p = torch.softmax(_causal_scores(q_block, k[i, g], p0, p1, group, future), 1)  # forward's, recomputed
        grad_v_t[:, :p1] += linear(grad_o.T.contiguous(), p.T)
        grad_s = linear(grad_o, v[i, g, :p1]).sub_(delta[i, p0:p1, heads].reshape(-1, 1)).mul_(p)  # over the scale
        grad_q.transpose(1, 2)[i, p0:p1, heads] = linear(grad_s, k[i, g, :p1].T).view(p1 - p0, group, d)
        grad_k_t[:, :p1] += linear(q_block.T.contiguous(), grad_s.T)
        if p1 == t:
            grad_k[i, g], grad_v[i, g] = grad_k_t.T, grad_v_t.T
    return grad_q, grad_k.mul_(scale), grad_v


class CausalAttention(torch.autograd.Function):
    """`forward` and `backward` for autograd: what `F.scaled_dot_product_attention(q, k, v, is_causal=True,
    enable_gqa=True)` computes, on the routed products."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = forward(q, k, v)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return backward(grad_out, *ctx.saved_tensors)
