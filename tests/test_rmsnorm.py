"""RMSNorm's closed-form backward: exact against the derivative, equal to autograd through `F.rms_norm`, in one
block of rows or several."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sct_edge.model import accounting, rmsnorm
from sct_edge.model.rmsnorm import rms_norm, rms_norm_and_pass


def inputs(shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g, dtype=dtype)).requires_grad_()
    return x, weight


@pytest.fixture(params=["one block", "blocks of 3 rows"])
def row_blocks(request, monkeypatch):
    """Both ways the norm runs: all rows in one block, or a few rows at a time (as large inputs are)."""
    if request.param != "one block":
        monkeypatch.setattr(accounting, "CACHE_BLOCK_BYTES", 3 * 64 * 4)  # 3 rows of 64 floats
    return request.param


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 16)])
def test_gradcheck_in_float64(shape, monkeypatch):
    monkeypatch.setattr(accounting, "CACHE_BLOCK_BYTES", 2 * shape[-1] * 8)  # backward in blocks of 2 rows, the last 1
    x, weight = inputs(shape)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, 1e-5), (x, weight))


def test_forward_and_gradients_equal_autograd_through_f_rms_norm(row_blocks):
    x, weight = inputs((4, 7, 64), torch.float32)
    grad = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(1))
    expected = F.rms_norm(x, (64,), weight, 1e-5)
    expected_grads = torch.autograd.grad(expected, (x, weight), grad)
    got = rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (x, weight), grad), expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_it_saves_only_its_input_and_the_reciprocal_rms():
    x, weight = inputs((4, 7, 64), torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, weight, 1e-5)
    assert sorted(t.numel() for t in saved) == [4 * 7, 64, 4 * 7 * 64]  # rstd, weight, x


def test_forward_in_blocks_of_rows_equals_the_fused_kernel_bit_for_bit():
    x, weight = (t.detach() for t in inputs((3, 70, 4096), torch.float32))  # 210 rows: blocks of 64, the last 18
    assert rmsnorm._chunk_rows(x) == 64
    expected, expected_rstd = torch.ops.aten._fused_rms_norm(x, [4096], weight, 1e-5)
    got, rstd = rmsnorm._forward(x.reshape(-1, 4096), weight, 1e-5)
    assert torch.equal(got.view_as(x), expected) and torch.equal(rstd.view_as(expected_rstd), expected_rstd)


def test_passing_x_on_sums_both_gradients_in_one_backward(row_blocks):
    """x + f(rms_norm(x)), the residual stream's shape: the same gradients as through `F.rms_norm` and autograd's
    own sum, with x's gradient coming out of the norm's backward alone."""
    x, weight = inputs((4, 7, 64), torch.float32)
    mix = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(3))
    expected = x + F.rms_norm(x, (64,), weight, 1e-5) @ mix
    normed, passed = rms_norm_and_pass(x, weight, 1e-5)
    got = passed + normed @ mix
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(passed, x) and passed.grad_fn is normed.grad_fn
    for a, b in zip(torch.autograd.grad(got, (x, weight), grad),
                    torch.autograd.grad(expected, (x, weight), grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_of_the_passed_x_in_float64(monkeypatch):
    monkeypatch.setattr(accounting, "CACHE_BLOCK_BYTES", 2 * 8 * 8)  # blocks of 2 rows
    x, weight = inputs((5, 8))
    assert torch.autograd.gradcheck(lambda a, w: [t * (i + 1) for i, t in enumerate(rms_norm_and_pass(a, w, 1e-5))],
                                    (x, weight))
