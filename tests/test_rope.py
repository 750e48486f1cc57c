"""RoPE as one rotation: exact against autograd, and equal bit for bit to the rotate-half composition."""

from __future__ import annotations

import pytest
import torch

from sct_edge.model import accounting
from sct_edge.model.config import get_preset
from sct_edge.model.rope import apply_rope, rope_tables


def rotate_half_composition(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Hugging Face formula as tensor ops: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def test_gradcheck_in_float64(monkeypatch):
    config = get_preset("tiny")
    cos, sin = (t.double() for t in rope_tables(config, torch.arange(5)))
    x = torch.randn(2, 3, 5, config.head_dim, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(accounting, "CACHE_BLOCK_BYTES", 2 * 2 * 3 * config.head_dim * 8)  # 2 positions a block
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos, sin), (x,))


@pytest.mark.parametrize("positions_a_block", [None, 3])  # all 7 at once, or blocks of 3, 3 and 1
@pytest.mark.parametrize("layout", ["contiguous", "seq-major"])  # the model's q: (batch, seq, heads) transposed
def test_equals_the_composition_and_its_gradient_bit_for_bit_and_keeps_the_layout(layout, positions_a_block,
                                                                                   monkeypatch):
    config = get_preset("tiny")
    if positions_a_block:
        monkeypatch.setattr(accounting, "CACHE_BLOCK_BYTES", positions_a_block * 2 * 3 * config.head_dim * 4)
    cos, sin = rope_tables(config, torch.arange(1, 8))  # positions 1..7: a cached decode would start past 0
    g = torch.Generator().manual_seed(0)
    shape = (2, 7, 3, config.head_dim) if layout == "seq-major" else (2, 3, 7, config.head_dim)
    x = torch.randn(shape, generator=g)
    x = (x.transpose(1, 2) if layout == "seq-major" else x).requires_grad_()
    grad = torch.randn(2, 3, 7, config.head_dim, generator=g)
    got, expected = apply_rope(x, cos, sin), rotate_half_composition(x, cos, sin)
    assert torch.equal(got, expected) and got.stride() == x.stride()
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])
