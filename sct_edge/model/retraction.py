"""Stiefel retraction of the spectral factors U and V after an optimizer step: fast, and exactly the QR point.

After AdamW moves a factor M (n x k, n >= k) off the Stiefel manifold, SCT retracts it to the Q factor of
its thin QR decomposition, with the signs chosen so that R has a positive diagonal. `householder_retraction`
is the reference (LAPACK Householder QR, then the sign correction); `retract_` is the fast in-place path the
trainer uses, and it lands on the same point.

Why the same point. A full-column-rank M has exactly one factorisation M = Q R with QᵀQ = I and R upper
triangular with a positive diagonal: if Q1 R1 = Q2 R2 are two, then Q2ᵀQ1 = R2 R1⁻¹ is orthogonal and upper
triangular, so diagonal with entries ±1, and positive diagonals make it I. Sign-corrected Householder QR
produces that factorisation by flipping column signs. CholeskyQR produces it by construction: G = MᵀM = L Lᵀ
with L the Cholesky factor (positive diagonal), R = Lᵀ and Q = M L⁻ᵀ; a second pass on Q (CholeskyQR2) gives
R = R2 R1, still upper triangular with a positive diagonal. Polar or Cayley retractions would land elsewhere.

Rounding moves both methods off the exact Q, and the measured orthonormality error bounds how far: a
computed Q̂ = M T̂ (T̂ upper triangular, positive diagonal) equals Q S with S = R T̂ upper triangular and
SᵀS = Q̂ᵀQ̂ = I + E, so S is the Cholesky factor of I + E and ‖Q̂ − Q‖_F = ‖S − I‖_F ≈ ‖E‖_F / √2.
What remains is the error of each method with respect to the exact Q, which grows like eps·κ(M) for both;
Householder's is the larger (measured in float32: 4e-6 at κ = 100, 5e-5 at κ = 1000 on 8192 x 32 factors,
while CholeskyQR2 stays below 1e-6). So agreement to 1e-5 in float32 holds exactly when κ(M) is at most
about 100, and `retract_` hands any factor beyond that (or whose Gram matrix is not numerically positive
definite) to Householder, so the result matches the reference for every input.

The fast path, factor by factor (each factor's data stays in cache from its first matmul to its last):

1. G = MᵀM, L = cholesky_ex(G), T = L⁻ᵀ formed explicitly (k x k, cheap), and Q = M T as a general
   matmul into a scratch buffer; MKL's triangular solve is several times slower than that matmul on these
   tall, thin shapes;
2. the Gram matrix of Q gives its orthonormality error, which is both the reported figure and the
   acceptance test: after an optimizer step κ(M) is close to 1, one pass is already as orthonormal as two
   (and as Householder), so Q is copied over the factor if the error is within `tol`, the factorisation
   succeeded, and max/min of diag(L) (a lower bound on κ(M)) is within `max_cond`;
3. otherwise the factor still holds M: it falls back to Householder if info != 0, G is not finite, or
   κ(M) = κ(L) exceeds `max_cond` (a norm bound on L and L⁻¹, and the singular values of L where that bound
   is loose); if not, the second CholeskyQR pass runs on Q.

That is three tall-skinny matmuls per factor (2nk² flops each), the fewest that also measure the result;
CholeskyQR2 plus a measurement takes five. Same-shape factors are not stacked into batches: on two cores,
stacking (a copy in and out) measured slower than going factor by factor, and so did batching only the
k x k steps across same-shape factors, because one factor at a time stays in cache across its three matmuls.
`tools/bench_retraction` times the whole against Householder on the sct-70b shapes. The only extra n x k
memory is one scratch buffer the size of the largest factor; nothing n x n is ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sct_edge.errors import SctError

# Orthonormality error (Frobenius) at which one CholeskyQR pass is accepted. float32: the
# one-pass error of a factor after an optimizer step measures 5e-7 (64 x 8) to 3e-6 (28672 x 128), below
# Householder's own 2e-6..5e-6; 1e-5 keeps the distance to the reference (about error / √2) under 1e-5.
DEFAULT_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

# Largest κ(M) kept on the fast path. float32: beyond ~100 Householder's own rounding (≈ 4e-8·κ per entry on
# the model's shapes) exceeds the 1e-5 agreement, so only Householder can reproduce itself. float64: the
# agreement would hold much further; CholeskyQR2 needs κ well below eps^(-1/2) ≈ 7e7, and 1e6 keeps a margin.
DEFAULT_MAX_COND = {torch.float32: 1e2, torch.float64: 1e6}


@dataclass
class RetractionResult:
    """What `retract_` did: the worst orthonormality it left and how each factor got there.

    `max_error` is the largest ‖QᵀQ − I‖_F over the factors, from Gram matrices computed in the factors'
    dtype (so for float32 it carries rounding of order eps·k itself). `fallbacks` counts the factors that
    went to Householder QR, `second_passes` those that needed the second CholeskyQR pass.
    """

    max_error: float = 0.0
    factors: int = 0
    fallbacks: int = 0
    second_passes: int = 0


def _check_matrix(m: Tensor, what: str) -> None:
    if m.ndim < 2:
        raise SctError(f"{what}: expected a matrix (..., n, k), got shape {tuple(m.shape)}")
    n, k = m.shape[-2:]
    if not 1 <= k <= n:
        raise SctError(f"{what}: a Stiefel factor needs rows >= columns >= 1, got {n} x {k}")
    if m.dtype not in DEFAULT_TOL:
        raise SctError(f"{what}: retraction supports float32 and float64 factors, got {m.dtype}")


def householder_retraction(m: Tensor) -> Tensor:
    """Q of the thin Householder QR of `m` (..., n, k), columns signed so that diag(R) > 0 (sign(0) = +1)."""
    _check_matrix(m, "householder_retraction")
    q, r = torch.linalg.qr(m)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -1.0, 1.0).to(m.dtype)
    return q * sign.unsqueeze(-2)


def orthonormality_error(m: Tensor) -> float:
    """max over the batch of ‖mᵀm − I‖_F for `m` (..., n, k), accumulated in float64."""
    _check_matrix(m, "orthonormality_error")
    if m.numel() == 0:
        return 0.0
    m64 = m.detach().to(torch.float64)
    eye = torch.eye(m.shape[-1], dtype=torch.float64, device=m.device)
    return float(torch.linalg.matrix_norm(m64.mT @ m64 - eye).max())


def _condition_at_most(lower: Tensor, upper_inv: Tensor, max_cond: float) -> bool:
    """Whether κ₂(L) = κ₂(M) is at most `max_cond`, given L and L⁻ᵀ.

    First the bound ‖A‖₂ <= sqrt(‖A‖₁‖A‖∞) applied to L and L⁻¹: a few k x k reductions, and within a few
    percent for the near-identity L of a factor after an optimizer step, but up to ~k/5 too high for a
    genuinely ill-conditioned M; only when it is inconclusive, the exact value from the singular values of L.
    """
    a, b = lower.abs(), upper_inv.abs()
    bound = (a.sum(-2).amax() * a.sum(-1).amax() * b.sum(-2).amax() * b.sum(-1).amax()).sqrt()
    if bound <= max_cond:
        return True
    sigma = torch.linalg.svdvals(lower.to(torch.float64))
    return bool(sigma[0] <= max_cond * sigma[-1])


def _inverse_transpose(lower: Tensor, eye: Tensor) -> Tensor:
    """L⁻ᵀ (upper triangular) of a lower-triangular L; `eye` is the identity of its size."""
    return torch.linalg.solve_triangular(lower, eye, upper=False).mT


def _retract_one(
    f: Tensor, buf: Tensor, eye: Tensor, tol: float, max_cond: float, index: int, result: RetractionResult
) -> float:
    """Retract one factor in place, using `buf` (same shape) for the product; returns the error it leaves."""
    gram = f.mT @ f
    lower, info = torch.linalg.cholesky_ex(gram)
    upper_inv = _inverse_transpose(lower, eye)
    torch.mm(f, upper_inv, out=buf)
    new_gram = buf.mT @ buf
    error = torch.dist(new_gram, eye).item()
    low, high = lower.diagonal().aminmax()
    # The common case: the factorisation worked, one pass reached `tol`, and the diagonal of L (whose
    # max/min is a lower bound on κ(M)) does not already show an ill-conditioned input.
    if info.item() == 0 and error <= tol and high.item() <= max_cond * low.item():
        f.copy_(buf)
        return error

    # f still holds the input, so whatever happens next can start from it.
    if info != 0 or not bool(torch.isfinite(gram).all()) or not _condition_at_most(lower, upper_inv, max_cond):
        if not bool(torch.isfinite(f).all()):
            raise SctError(f"retraction: factor #{index} ({f.shape[0]} x {f.shape[1]}) holds NaN or Inf")
        result.fallbacks += 1
        f.copy_(householder_retraction(f))
        return torch.dist(f.mT @ f, eye).item()

    # Well conditioned, only short of `tol` after one pass: the second CholeskyQR pass, on the first-pass
    # result (κ close to 1, so its factorisation cannot fail short of NaN), written straight into f.
    lower2, info2 = torch.linalg.cholesky_ex(new_gram)
    if info2 != 0:
        result.fallbacks += 1
        f.copy_(householder_retraction(f))
    else:
        result.second_passes += 1
        torch.mm(buf, _inverse_transpose(lower2, eye), out=f)
    return torch.dist(f.mT @ f, eye).item()


def retract_(
    factors: Sequence[Tensor],
    *,
    tol: float | None = None,
    max_cond: float | None = None,
) -> RetractionResult:
    """Retract every 2-D factor (n x k, n >= k) in place onto the Stiefel manifold; see the module docstring.

    The point is the Q of sign-corrected Householder QR, `householder_retraction` (to 1e-5 in float32).
    `tol` is the orthonormality error (Frobenius) one CholeskyQR pass must reach to be accepted, and
    `max_cond` the largest condition number kept off the Householder fallback; both default per dtype
    (`DEFAULT_TOL`, `DEFAULT_MAX_COND`). Returns a `RetractionResult`: the worst orthonormality error left
    and how many factors fell back or took a second pass. A factor that is not a float32/float64 n x k
    matrix with n >= k >= 1, or that holds NaN or Inf, is a `SctError`. Factors may be any strided views
    (of a larger store, say); they are written in place.
    """
    result = RetractionResult(factors=len(factors))
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for index, f in enumerate(factors):
        if f.ndim != 2:
            raise SctError(f"retraction: factor #{index} has shape {tuple(f.shape)}, expected a 2-D n x k matrix")
        _check_matrix(f, f"retraction: factor #{index}")
        key = (f.dtype, f.device)
        sizes[key] = max(sizes.get(key, 0), f.numel())

    # One product buffer per dtype and device, as large as the largest factor, shared by all of them.
    flat = {key: torch.empty(size, dtype=key[0], device=key[1]) for key, size in sizes.items()}
    eyes: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
    worst = 0.0
    with torch.no_grad():
        for index, f in enumerate(factors):
            n, k = f.shape
            eye = eyes.get((k, f.dtype, f.device))
            if eye is None:
                eye = eyes[k, f.dtype, f.device] = torch.eye(k, dtype=f.dtype, device=f.device)
            tol_ = DEFAULT_TOL[f.dtype] if tol is None else tol
            cond_ = DEFAULT_MAX_COND[f.dtype] if max_cond is None else max_cond
            buf = flat[f.dtype, f.device][: n * k].view(n, k)
            worst = max(worst, _retract_one(f, buf, eye, tol_, cond_, index, result))
    result.max_error = worst
    return result
