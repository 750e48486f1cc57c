"""The spectral linear map: exact factored gradients, truncated SVD by rank and by energy."""

import pytest
import torch

from sct_edge.errors import SctError
from sct_edge.model.spectral import SpectralLinear, rank_for_energy, spectral_apply, truncated_svd


@pytest.mark.parametrize("n_in,n_out,rank,batch", [(7, 5, 3, 4), (16, 32, 8, 2), (33, 12, 12, 5)])
def test_factored_gradients_equal_dense_gradients(n_in, n_out, rank, batch):
    g = torch.Generator().manual_seed(0)
    U = torch.randn(n_in, rank, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.randn(rank, dtype=torch.float64, generator=g, requires_grad=True)
    V = torch.randn(n_out, rank, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(batch, 3, n_in, dtype=torch.float64, generator=g)
    target = torch.randn(batch, 3, n_out, dtype=torch.float64, generator=g)

    loss = ((spectral_apply(x, U, s, V) - target) ** 2).sum()
    factored = torch.autograd.grad(loss, (U, s, V))

    # The reference builds W = U diag(s) Vᵀ explicitly and differentiates through it.
    W = U @ torch.diag(s) @ V.T
    dense_loss = ((x @ W - target) ** 2).sum()
    reference = torch.autograd.grad(dense_loss, (U, s, V))

    assert torch.allclose(loss, dense_loss, rtol=0, atol=1e-8 * max(1.0, dense_loss.item()))
    for got, want in zip(factored, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-8)


def test_forward_never_builds_dense_matrix():
    """Every intermediate of the forward is (…, k) or (…, out): nothing of in × out size is saved."""
    layer = SpectralLinear(64, 48, rank=4)
    x = torch.randn(2, 64)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        layer(x).sum().backward()
    assert max(sizes) < 64 * 48


@pytest.mark.parametrize("shape", [(12, 20), (30, 9), (16, 16)])
def test_from_dense_full_rank_reproduces_weight(shape):
    w = torch.randn(*shape)
    layer = SpectralLinear.from_dense(w, rank=min(shape))
    torch.testing.assert_close(layer.to_dense(), w, rtol=0, atol=1e-5)
    x = torch.randn(3, shape[1])
    torch.testing.assert_close(layer(x), x @ w.T, rtol=0, atol=1e-4)
    eye = torch.eye(layer.rank)
    assert (layer.U.T @ layer.U - eye).abs().max() < 1e-5
    assert (layer.V.T @ layer.V - eye).abs().max() < 1e-5


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95, 0.999, 1.0])
def test_energy_target_keeps_energy_with_smallest_rank(energy):
    g = torch.Generator().manual_seed(1)
    # A decaying spectrum, like a trained weight's.
    a, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    b, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0, -2, 24, dtype=torch.float64)
    w = (a[:, :24] * sigma) @ b.T
    U, s, V = truncated_svd(w, energy=energy)
    k = s.numel()
    total = (sigma**2).sum()
    assert (s**2).sum() / total >= energy - 1e-12
    if k > 1:
        assert (sigma[: k - 1] ** 2).sum() / total < energy
    assert rank_for_energy(sigma, energy) == k
    assert U.shape == (24, k) and V.shape == (40, k)


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"rank": 13}, {"energy": 0.0}, {"energy": 1.5}, {}])
def test_bad_truncation_arguments(kwargs):
    with pytest.raises(SctError):
        truncated_svd(torch.randn(12, 10), **kwargs)
