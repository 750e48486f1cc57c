"""Rotary position embedding (RoPE) in the Hugging Face rotate-half layout: the tables and their application.

Written as tensor ops, `x·cos + rotate_half(x)·sin` is five passes over q or k (a product, a negation, a
concatenation, a second product and a sum) and as many again in backward, each allocating a q-sized tensor.
`RotaryEmbedding` takes x·cos over the whole width, the swapped halves times a sign-folded sine into one
scratch, and one sum; its backward is the inverse rotation done the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sct_edge.model.accounting import rows_per_cache_block
from sct_edge.model.config import ModelConfig


def rope_tables(config: ModelConfig, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin (len(positions) × head_dim) in the Hugging Face rotate-half layout: pair (i, i + d/2)."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """Each pair (x₁, x₂) at (i, i + d/2) turned by its angle: (x₁c₁ − x₂s₁, x₂c₂ + x₁s₂), or by minus it:
    (x₁c₁ + x₂s₂, x₂c₂ − x₁s₁).

    x·cos in one pass over the whole width, the swapped halves times the sine (its sign folded into the table:
    negating is exact) into one scratch, and one sum: each product is rounded before the sum, as in the
    composition (a fused multiply-add, `addcmul_`, rounds once, and the engine's equality tests with the
    in-memory reference, which Adam amplifies, see the change). On llama3-8b's q at 4 × 512 it took 5.81 ms
    where six half-width passes took 7.11 (interleaved medians of 13; k 0.77 against 1.15 ms).

    The passes run a cache-sized block of positions at a time (`accounting.CACHE_BLOCK_BYTES`), so the sum finds
    its operands in cache: llama3-8b's q 3.7–3.9 ms against 7.0–7.5 whole, k 0.75–0.86 against 1.45–2.2."""
    half, seq = x.shape[-1] // 2, x.shape[-2]
    s1, s2 = sin[..., :half], sin[..., half:]
    # What multiplies x₂ in the first half and x₁ in the second.
    signed_sin = torch.cat([s2, -s1] if inverse else [-s1, s2], dim=-1)
    step = rows_per_cache_block(x.numel() // max(1, seq) * x.element_size())
    out = torch.empty_like(x)  # x's strides: q and k stay (batch, seq, heads)-major, so attention's output does too
    scratch = torch.empty_like(x[..., :step, :])
    for start in range(0, seq, step):
        positions = slice(start, start + step)
        part, rotated = x[..., positions, :], out[..., positions, :]
        turned = scratch[..., : part.shape[-2], :]
        torch.mul(part, cos[positions], out=rotated)
        torch.mul(part[..., half:], signed_sin[positions, :half], out=turned[..., :half])
        torch.mul(part[..., :half], signed_sin[positions, half:], out=turned[..., half:])
        rotated.add_(turned)
    return out


class RotaryEmbedding(torch.autograd.Function):
    """RoPE as one rotation in forward and its inverse in backward; saves only the tables."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (… × seq × head_dim) rotated by the tables of its positions (seq × head_dim)."""
    # In x's dtype: under bfloat16 autocast the float32 tables would promote q and k back to float32.
    return RotaryEmbedding.apply(x, cos.to(x.dtype), sin.to(x.dtype))
