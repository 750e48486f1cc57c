"""The spectral linear map W = U diag(s) Vᵀ, applied as three small products and never built dense.

Shapes for a map with `n_in` inputs and `n_out` outputs at rank k: U (n_in × k), s (k), V (n_out × k),
with orthonormal columns in U and V. `y = ((x @ U) * s) @ V.T` costs O(b·k·(n_in + n_out)); autograd
through the same three products gives the exact gradients dL/dU, dL/ds, dL/dV, again with no
n_in × n_out tensor anywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sct_edge.errors import SctError
from sct_edge.model.products import accumulate_linear, linear, product, transposed_product


def spectral_apply(x: Tensor, U: Tensor, s: Tensor, V: Tensor) -> Tensor:
    """y = x W with W = U diag(s) Vᵀ, evaluated right to left so only (…, k) intermediates exist."""
    return product(product(x, U.T) * s, V)


class SharedInputProjections(torch.autograd.Function):
    """x·U for the spectral maps that read the same x (attention's q, k and v; or o alone), each returned on its own.

    Left to autograd, each map's input gradient is its own x-sized product, summed by separate passes: on
    llama3-8b r128 at 4 × 512 the three products and two adds took 72–82 ms, against 37–39 ms when each product
    adds into one tensor (`accumulate_linear`: `addmm_`, or oneDNN's product and an in-place add), as backward
    does here.
    Forward returns `recorded` instead when given: a memo's outputs for the same x and factors
    (`sct_edge/model/memo.py`), so a recompute skips the products.
    Saves only x and the factors. Under autocast the products run in its dtype, in backward too.
    """

    @staticmethod
    def forward(ctx, x: Tensor, recorded: tuple[Tensor, ...] | None, *factors: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(x, *factors)
        if recorded is not None:
            return tuple(t.view_as(t) for t in recorded)  # fresh aliases: the graph attaches to them
        flat = x.reshape(-1, x.shape[-1])
        return tuple(linear(flat, U.T).view(*x.shape[:-1], U.shape[1]) for U in factors)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, *factors = ctx.saved_tensors
        dtype = grads[0].dtype
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        grad_x, grad_factors = None, []
        for grad, U in zip(grads, factors, strict=True):
            grad = grad.reshape(-1, grad.shape[-1])
            grad_factors.append(transposed_product(flat, grad).contiguous().to(U.dtype))
            U = U.to(dtype)  # noqa: N806
            if grad_x is None:
                grad_x = linear(grad, U).to(x.dtype)
            elif dtype == x.dtype:
                grad_x = accumulate_linear(grad_x, grad, U)
            else:  # half-precision products: summed in x's dtype, as autograd sums the casts' gradients
                grad_x += linear(grad, U)
        return grad_x.view(x.shape), None, *grad_factors


def rank_out(a: Tensor, V: Tensor, residual: Tensor | None = None) -> Tensor:
    """a Vᵀ (… × k to … × n_out), plus `residual` when given: folded into the product (`addmm`, one pass less over
    the output) when all three share a dtype outside autocast, else added after it in the promoted dtype (the
    float32 residual stream stays float32 under bfloat16 autocast)."""
    return product(a, V, residual)


def random_orthonormal(n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """n × k with orthonormal columns: sign-corrected QR of a Gaussian matrix (Haar-distributed)."""
    q, r = torch.linalg.qr(torch.randn(n, k, generator=generator))
    return (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).contiguous()


def init_scale(n_in: int, n_out: int, rank: int, std: float) -> float:
    """The constant s that gives outputs the variance of a dense N(0, std²) init.

    For x with iid entries, E‖x W_dense‖² = n_out·std²·‖x‖² while E‖x U diag(s) Vᵀ‖² = k·s²·‖x‖²/n_in, so
    s = std·sqrt(n_in·n_out/k). With std = 1/sqrt(n_in) this is sqrt(n_out/k). (The seeds used s = 1,
    which shrinks every layer's output by sqrt(k/n_out) and starves deep stacks of signal.)
    """
    return std * math.sqrt(n_in * n_out / rank)


def truncated_svd(w: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Factor a dense W (n_out × n_in, nn.Linear layout) into (U, s, V) with U n_in × k, V n_out × k.

    Exactly one of `rank` (fixed k) or `energy` (smallest k with Σ kept σ² / Σ all σ² >= energy) is given.
    The SVD runs in float64 so the kept energy and the reconstruction are exact to float32 precision.
    """
    if (rank is None) == (energy is None):
        raise SctError("truncated_svd needs exactly one of rank or energy")
    n_out, n_in = w.shape
    a, sigma, bt = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise SctError(f"energy must be in (0, 1], got {energy}")
        k = rank_for_energy(sigma, energy)
    else:
        if not 1 <= rank <= min(n_in, n_out):
            raise SctError(f"rank {rank} is outside 1..{min(n_in, n_out)} for a {n_out} x {n_in} matrix")
        k = rank
    dtype = w.dtype if w.dtype.is_floating_point else torch.float32
    return bt[:k].T.contiguous().to(dtype), sigma[:k].to(dtype), a[:, :k].contiguous().to(dtype)


def rank_for_energy(sigma: Tensor, energy: float) -> int:
    """Smallest k whose leading singular values keep at least `energy` of Σσ²."""
    power = sigma.to(torch.float64) ** 2
    kept = torch.cumsum(power, 0) / power.sum()
    # A relative tolerance keeps energy=1.0 from demanding more rank than rounding allows.
    k = int(torch.searchsorted(kept, torch.tensor(energy, dtype=torch.float64) - 1e-12).item()) + 1
    return min(k, sigma.numel())


class SpectralLinear(nn.Module):
    """Drop-in for `nn.Linear(n_in, n_out, bias=False)` holding U, s, V instead of the weight."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        rank: int,
        std: float | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(n_in, n_out):
            raise SctError(f"rank {rank} is outside 1..{min(n_in, n_out)} for a {n_in} -> {n_out} map")
        self.n_in, self.n_out, self.rank = n_in, n_out, rank
        if device is not None and torch.device(device).type == "meta":
            self.U = nn.Parameter(torch.empty(n_in, rank, device="meta"))
            self.s = nn.Parameter(torch.empty(rank, device="meta"))
            self.V = nn.Parameter(torch.empty(n_out, rank, device="meta"))
            return
        std = 1.0 / math.sqrt(n_in) if std is None else std
        self.U = nn.Parameter(random_orthonormal(n_in, rank, generator))
        self.s = nn.Parameter(torch.full((rank,), init_scale(n_in, n_out, rank, std)))
        self.V = nn.Parameter(random_orthonormal(n_out, rank, generator))

    @classmethod
    def from_dense(cls, weight: Tensor, rank: int | None = None, energy: float | None = None) -> SpectralLinear:
        """Truncated SVD of an `nn.Linear` weight (n_out × n_in): fixed rank or a spectral-energy target."""
        U, s, V = truncated_svd(weight, rank=rank, energy=energy)
        layer = cls(weight.shape[1], weight.shape[0], U.shape[1], device="meta")
        layer.U, layer.s, layer.V = nn.Parameter(U), nn.Parameter(s), nn.Parameter(V)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return spectral_apply(x, self.U, self.s, self.V)

    def to_dense(self) -> Tensor:
        """The n_out × n_in weight, for export and tests only: training never calls this."""
        return (self.V * self.s) @ self.U.T

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}, rank={self.rank}"
