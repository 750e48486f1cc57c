"""The sliced spectral SwiGLU MLP: exact against autograd through the plain composition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sct_edge.model import accounting, fused
from sct_edge.model.config import RankPolicy, get_preset
from sct_edge.model.swiglu import SpectralSwiGLU, slices_pay_off
from sct_edge.model.transformer import MLP


def plain(x, U_g, s_g, V_g, U_u, s_u, V_u, U_d, s_d, V_d):  # noqa: N803
    g = ((x @ U_g) * s_g) @ V_g.T
    u = ((x @ U_u) * s_u) @ V_u.T
    return (((F.silu(g) * u) @ U_d) * s_d) @ V_d.T


def factors(tokens: int, dim: int, ffn: int, rank: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(tokens, dim, generator=g, dtype=dtype)]
    for n_in, n_out in ((dim, ffn), (dim, ffn), (ffn, dim)):
        out += [torch.randn(n_in, rank, generator=g, dtype=dtype), torch.randn(rank, generator=g, dtype=dtype),
                torch.randn(n_out, rank, generator=g, dtype=dtype)]
    return [t.requires_grad_() for t in out]


def sliced(x, *weights, residual=None, chunk=8, dtype=torch.float64, memo=None):
    """`SpectralSwiGLU` on x and the factors as `factors` orders them."""
    return SpectralSwiGLU.apply(x, residual, *weights, chunk, dtype, memo)


@pytest.fixture(params=["fused", "torch"])
def silu_route(request, monkeypatch) -> str:
    """The slices' element-wise work on the compiled kernels (`sct_edge/model/fused.py`) or on torch's ops."""
    if request.param == "fused" and not fused.available():
        pytest.skip("no C compiler: torch's ops stand in")
    if request.param == "torch":
        monkeypatch.setattr(fused, "_kernel", lambda name, tensors: None)
    return request.param


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])  # slices of one column, uneven slices, one slice for all
def test_gradcheck_in_float64(chunk, silu_route):
    args = factors(tokens=7, dim=5, ffn=11, rank=3)
    assert torch.autograd.gradcheck(lambda *a: sliced(*a, chunk=chunk), args)


def test_a_residual_is_added_to_the_output_and_gets_the_output_gradient():
    args = factors(tokens=7, dim=5, ffn=11, rank=3)
    residual = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, *a: sliced(*a, residual=r, chunk=4), (residual, *args))
    torch.testing.assert_close(sliced(*args, residual=residual), residual + sliced(*args), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_forward_and_every_gradient_equal_autograd_through_the_plain_composition(dtype, tolerance, products_route,
                                                                               silu_route):
    args = factors(tokens=33, dim=16, ffn=40, rank=6, dtype=dtype)
    grad_y = torch.randn(33, 16, generator=torch.Generator().manual_seed(3), dtype=dtype)
    expected = plain(*args)
    expected_grads = torch.autograd.grad(expected, args, grad_y)
    got = sliced(*args, dtype=dtype)
    got_grads = torch.autograd.grad(got, args, grad_y)
    # Relative to each tensor's norm: float32 sums over the FFN in another order, single entries may cancel.
    for a, b in zip([got, *got_grads], [expected, *expected_grads], strict=True):
        assert float((a - b).detach().norm() / b.detach().norm()) < tolerance


def test_the_model_mlp_is_the_same_map_sliced_or_not(monkeypatch):
    spectral = get_preset("tiny").with_ranks(RankPolicy.uniform(4))
    mlp = MLP(spectral, layer=0, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 5, spectral.dim, generator=torch.Generator().manual_seed(2))
    reference = mlp.down(F.silu(mlp.gate(x)) * mlp.up(x))
    assert not slices_pay_off(x, spectral.ffn_dim)  # tiny tensors: the plain composition
    monkeypatch.setattr(accounting, "SLICE_FROM_BYTES", 1)  # every size: the slices
    assert slices_pay_off(x, spectral.ffn_dim)
    torch.testing.assert_close(mlp(x), reference, rtol=1e-5, atol=1e-6)


def test_under_bfloat16_autocast_it_matches_the_plain_composition_and_returns_float32_gradients(monkeypatch):
    """The engine's bfloat16 compute: the sliced products in bfloat16 with float32 sums over slices, against
    the plain composition under the same autocast (both off the float64 truth by bfloat16 rounding only)."""
    spectral = get_preset("tiny").with_ranks(RankPolicy.uniform(8))
    mlp = MLP(spectral, layer=0, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 16, spectral.dim, generator=torch.Generator().manual_seed(2)).requires_grad_()
    params = [x, *mlp.parameters()]
    grad_y = torch.randn(4, 16, spectral.dim, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = mlp.down(F.silu(mlp.gate(x)) * mlp.up(x))
    reference_grads = torch.autograd.grad(reference, params, grad_y)
    monkeypatch.setattr(accounting, "SLICE_FROM_BYTES", 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mlp(x)
    got_grads = torch.autograd.grad(got, params, grad_y)
    assert got.dtype == reference.dtype == torch.bfloat16
    for a, b, p in zip([got, *got_grads], [reference, *reference_grads], [x, *params], strict=True):
        assert a.dtype == b.dtype and (a is got or a.dtype == p.dtype == torch.float32)
        a, b = a.detach().float(), b.detach().float()
        assert float((a - b).norm() / b.norm()) < 2e-2
