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

The fast path, for each group of same-(shape, dtype, device) factors:

1. G = MᵀM per factor into one (B, k, k) batch; L = cholesky_ex(G) for the whole batch;
2. a factor falls back to Householder if info != 0, G is not finite, or κ(M) = κ(L) exceeds `max_cond`
   (checked with a free norm bound, and with the singular values of L only where the bound is loose);
3. T = L⁻ᵀ formed explicitly for the batch (k x k, cheap) and Q = M T as a general matmul, which runs at
   several times the speed of MKL's triangular solve on these tall, thin shapes;
4. the Gram matrix of Q gives its orthonormality error, which is both the reported figure and the test for
   the second CholeskyQR pass: after an optimizer step κ(M) is close to 1 and one pass is already as
   orthonormal as two (and as Householder), so the second pass only runs where the error exceeds `tol`.

That is three tall-skinny matmuls per factor (2nk² flops each), the least that also measures the result;
straightforward CholeskyQR2 plus a measurement takes five. Same-shape factors share every k x k step
(one batched call each), but their n x k data is not stacked into one tensor: the products run per factor,
at the same speed as a batched matmul, through one reused n x k buffer (which stays in cache for the Gram
matrix of the result before it is copied back), so there is no extra pass to stack and unstack and the
extra memory is that buffer plus the (B, k, k) batches, in slices of at most `_BATCH_BYTES`. Nothing
n x n is ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sct_edge.errors import SctError

# First-pass orthonormality (Frobenius) below which the second CholeskyQR pass is skipped. float32: the
# one-pass error of a factor after an optimizer step measures 5e-7 (64 x 8) to 3e-6 (28672 x 128), below
# Householder's own 2e-6..5e-6; 1e-5 keeps the distance to the reference (about error / √2) under 1e-5.
DEFAULT_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

# Largest κ(M) kept on the fast path. float32: beyond ~100 Householder's own rounding (≈ 4e-8·κ per entry on
# the model's shapes) exceeds the 1e-5 agreement, so only Householder can reproduce itself. float64: the
# agreement would hold much further; CholeskyQR2 needs κ well below eps^(-1/2) ≈ 7e7, and 1e6 keeps a margin.
DEFAULT_MAX_COND = {torch.float32: 1e2, torch.float64: 1e6}

# Size of one (B, k, k) batch; a group of more same-shape factors than fit goes in several batches.
_BATCH_BYTES = 16 << 20


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


def _gram_errors(g: Tensor) -> Tensor:
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    return torch.linalg.matrix_norm(g - eye)


def _condition_at_most(lower: Tensor, upper_inv: Tensor, max_cond: float) -> Tensor:
    """Which κ₂(L) = κ₂(M) are at most `max_cond`, given L and L⁻ᵀ.

    First the bound ‖A‖₂ <= sqrt(‖A‖₁‖A‖∞) applied to L and L⁻¹: free, and within a few percent for the
    near-identity L of a factor after an optimizer step, but up to ~k/5 too high for a genuinely
    ill-conditioned M. Only factors that fail the bound get the exact value from the singular values of L.
    """
    a, b = lower.abs(), upper_inv.abs()
    bound = (a.sum(-2).amax(-1) * a.sum(-1).amax(-1) * b.sum(-2).amax(-1) * b.sum(-1).amax(-1)).sqrt()
    ok = bound <= max_cond
    unsure = (~ok).nonzero().flatten()
    if len(unsure):
        sigma = torch.linalg.svdvals(lower[unsure].to(torch.float64))
        ok[unsure] = sigma[:, 0] <= max_cond * sigma[:, -1]
    return ok


def _inverse_transpose(lower: Tensor) -> Tensor:
    """L⁻ᵀ (upper triangular) of a batch of lower-triangular L."""
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device).expand_as(lower)
    return torch.linalg.solve_triangular(lower, eye, upper=False).mT


def _retract_group(
    factors: Sequence[Tensor], indices: Sequence[int], tol: float, max_cond: float, result: RetractionResult
) -> float:
    """Retract same-shape factors (`indices`: their places in the caller's list) in place.

    Counts into `result`; returns the worst orthonormality error it leaves.
    """
    n, k = factors[0].shape
    like = factors[0]
    gram = torch.empty(len(factors), k, k, dtype=like.dtype, device=like.device)
    for f, g in zip(factors, gram, strict=True):
        torch.mm(f.mT, f, out=g)
    finite = torch.isfinite(gram).all(dim=(-2, -1))
    lower, info = torch.linalg.cholesky_ex(gram)
    ok = (info == 0) & finite
    if not ok.all():
        # Failed factorisations hold garbage; the identity keeps their inverses finite until they are dropped.
        lower = torch.where(ok[:, None, None], lower, torch.eye(k, dtype=like.dtype, device=like.device))
    upper_inv = _inverse_transpose(lower)
    ok &= _condition_at_most(lower, upper_inv, max_cond)

    # One n x k buffer takes each product: it stays in cache for the Gram matrix of the result before it
    # is copied over the factor, and it is the only n x k memory this allocates.
    buf = torch.empty(n, k, dtype=like.dtype, device=like.device)
    new_gram = torch.empty_like(gram)
    for i, (f, fast) in enumerate(zip(factors, ok.tolist(), strict=True)):
        if fast:
            torch.mm(f, upper_inv[i], out=buf)
            torch.mm(buf.mT, buf, out=new_gram[i])
            f.copy_(buf)
            continue
        if not finite[i] and not bool(torch.isfinite(f).all()):
            raise SctError(f"retraction: factor #{indices[i]} ({n} x {k}) holds NaN or Inf")
        result.fallbacks += 1
        f.copy_(householder_retraction(f))
        torch.mm(f.mT, f, out=new_gram[i])
    errors = _gram_errors(new_gram)

    # Second CholeskyQR pass, only where the first did not reach `tol`. The first pass leaves κ close to 1,
    # so this factorisation succeeding is all that needs checking; if it does not, Householder of the
    # first-pass result is the same point as Householder of the input (same column space, same orientation).
    again = ((errors > tol) & ok).nonzero().flatten()
    if len(again):
        lower2, info2 = torch.linalg.cholesky_ex(new_gram[again])
        upper_inv2 = _inverse_transpose(lower2)
        for j, (i, fine) in enumerate(zip(again.tolist(), (info2 == 0).tolist(), strict=True)):
            f = factors[i]
            if fine:
                result.second_passes += 1
                torch.mm(f, upper_inv2[j], out=buf)
                f.copy_(buf)
            else:
                result.fallbacks += 1
                f.copy_(householder_retraction(f))
            torch.mm(f.mT, f, out=new_gram[i])
        errors[again] = _gram_errors(new_gram[again])
    return float(errors.max())


def retract_(
    factors: Sequence[Tensor],
    *,
    tol: float | None = None,
    max_cond: float | None = None,
) -> RetractionResult:
    """Retract every 2-D factor (n x k, n >= k) in place onto the Stiefel manifold; see the module docstring.

    The point is the Q of sign-corrected Householder QR, `householder_retraction` (to 1e-5 in float32).
    `tol` is the first-pass orthonormality that skips the second CholeskyQR pass and `max_cond` the largest
    condition number kept off the Householder fallback; both default per dtype (`DEFAULT_TOL`,
    `DEFAULT_MAX_COND`). Returns a `RetractionResult` (the worst orthonormality error left, fallback and
    second-pass counts). A factor that is not a float32/float64 n x k matrix with n >= k >= 1, or that holds
    NaN or Inf, is a `SctError`. Factors may be any strided views; they are written in place.
    """
    result = RetractionResult(factors=len(factors))
    groups: dict[tuple, list[int]] = {}
    for index, f in enumerate(factors):
        if f.ndim != 2:
            raise SctError(f"retraction: factor #{index} has shape {tuple(f.shape)}, expected a 2-D n x k matrix")
        _check_matrix(f, f"retraction: factor #{index}")
        groups.setdefault((tuple(f.shape), f.dtype, f.device), []).append(index)

    worst = 0.0
    with torch.no_grad():
        for (shape, dtype, _), indices in groups.items():
            k = shape[1]
            per_batch = max(1, _BATCH_BYTES // (k * k * factors[indices[0]].element_size()))
            for start in range(0, len(indices), per_batch):
                batch = indices[start : start + per_batch]
                error = _retract_group(
                    [factors[i] for i in batch],
                    batch,
                    DEFAULT_TOL[dtype] if tol is None else tol,
                    DEFAULT_MAX_COND[dtype] if max_cond is None else max_cond,
                    result,
                )
                worst = max(worst, error)
    result.max_error = worst
    return result
