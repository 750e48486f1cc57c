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

The fast path, factor by factor (each factor's data stays in cache from its first product to its last):

1. G = MᵀM (lower triangle only, `syrk`), L = cholesky(G), and L⁻¹ (k x k, cheap). If G is not finite, the
   factorisation fails, or κ(M) = κ(L) exceeds `max_cond` (a norm bound on L and L⁻¹, and the singular values
   of L where that bound is loose), the factor goes to Householder untouched;
2. otherwise Q = M L⁻ᵀ by a triangular product in place (`trmm`), and the Gram matrix of Q gives its
   orthonormality error, which is both the reported figure and the acceptance test: after an optimizer step
   κ(M) is close to 1 and one pass is already as orthonormal as two (and as Householder);
3. a factor short of `tol` takes the second CholeskyQR pass on Q, whose Gram matrix is already there.

On the CPU the two n x k products run in OpenBLAS (`sct_edge.model.openblas`, for factors of rank 48 and up
when torch uses more than one thread, see `THREADED_MIN_RANK`): `syrk` and `trmm` do half the
arithmetic of the general products torch offers for the same jobs: a factor costs 3nk² flops (Gram,
product, Gram) where three general products cost 6nk², and the only n x k memory is the factor itself. The factors
are spread over as many Python threads as torch has compute threads, each running single-threaded OpenBLAS
(ctypes releases the GIL): one set of threads for the machine's cores, not a second pool beside torch's.
Other factors (narrower, on other devices, or whose columns are not adjacent in memory) take the same steps
with torch's products (Q formed as M·L⁻ᵀ into a scratch buffer) in the calling thread (`uses_openblas` says
which). `tools/bench_retraction` times the whole against Householder on the sct-70b shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from sct_edge.errors import SctError
from sct_edge.model import openblas

# Orthonormality error (Frobenius) at which one CholeskyQR pass is accepted. float32: the
# one-pass error of a factor after an optimizer step measures 5e-7 (64 x 8) to 3e-6 (28672 x 128), below
# Householder's own 2e-6..5e-6; 1e-5 keeps the distance to the reference (about error / √2) under 1e-5.
DEFAULT_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

# Largest κ(M) kept on the fast path. float32: beyond ~100 Householder's own rounding (≈ 4e-8·κ per entry on
# the model's shapes) exceeds the 1e-5 agreement, so only Householder can reproduce itself. float64: the
# agreement would hold much further; CholeskyQR2 needs κ well below eps^(-1/2) ≈ 7e7, and 1e6 keeps a margin.
DEFAULT_MAX_COND = {torch.float32: 1e2, torch.float64: 1e6}

# Narrowest factor that takes OpenBLAS's products when torch computes on more than one thread. Narrower ones
# are too small for two threads to share well: one sct-70b layer (2 threads, AVX-512 kernels, ms) measured
# 11.2 with OpenBLAS against 10.3 with torch's general products at rank 32, 15.0 / 17.4 at 48, 20.0 / 30.1 at
# 64, 41.6 / 111.7 at 128. On one thread OpenBLAS is the faster at every rank (9.4 / 15.8 at rank 32).
THREADED_MIN_RANK = 48

PROFILER_LABEL = "sct::retraction"  # the range `retract_` records in torch.profiler traces


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


@dataclass(frozen=True)
class _Retracted:
    """A factor the fast path retracted: the orthonormality error it left, and whether it took two passes."""

    error: float
    second_pass: bool


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


class _Steps(Protocol):
    """The fast path's steps on one backend, its k x k matrices numpy arrays or torch tensors."""

    in_place: bool  # whether `solve` overwrites M with Q

    def gram(self, f: Tensor): ...  # fᵀf; only its lower triangle is read

    def cholesky(self, gram) -> tuple[object, bool]: ...  # (L, whether the factorisation succeeded)

    def inverse(self, lower): ...  # L⁻¹

    def solve(self, m: Tensor, lower, lower_inv, out: Tensor | None = None) -> Tensor: ...  # Q = M L⁻ᵀ

    def error(self, gram) -> float: ...  # ‖G − I‖_F

    def numpy(self, a) -> np.ndarray: ...


class _OpenBlasSteps:
    """Every step in OpenBLAS, k x k matrices as numpy arrays: no torch op, so it can run in any thread. Q = M·L⁻ᵀ
    is a triangular product that overwrites M (`out` is M itself or None)."""

    in_place = True
    gram = staticmethod(openblas.gram_lower)
    inverse = staticmethod(openblas.inverse_lower)

    def cholesky(self, gram: np.ndarray) -> tuple[np.ndarray, bool]:
        lower, info = openblas.cholesky_lower(gram)
        return lower, info == 0

    def solve(self, m: Tensor, lower: np.ndarray, lower_inv: np.ndarray, out: Tensor | None = None) -> Tensor:
        openblas.multiply_lower_transposed_(m, lower_inv)
        return m

    def error(self, gram: np.ndarray) -> float:
        """From the lower triangle (zeros above), summed in float64. Element-wise sums, not `np.vdot` or `@`:
        those call numpy's own OpenBLAS, whose thread pool would wake up and spin on the cores the retraction's
        threads are using (measured: the whole retraction ran 2x slower)."""
        squares = np.square(gram, dtype=np.float64)
        np.fill_diagonal(squares, np.square(np.diagonal(gram) - 1.0, dtype=np.float64) / 2.0)
        return float(np.sqrt(2.0 * squares.sum()))

    def numpy(self, a: np.ndarray) -> np.ndarray:
        return a


class _TorchSteps:
    """Every step with torch ops, in the calling thread: Q = M·L⁻ᵀ as a general product into `out`, by default
    `scratch` (at least as many elements as the largest factor, same dtype and device), so M stays as it is."""

    in_place = False

    def __init__(self, scratch: Tensor) -> None:
        self.scratch = scratch
        self.eyes: dict[int, Tensor] = {}

    def eye(self, k: int) -> Tensor:
        if k not in self.eyes:
            self.eyes[k] = torch.eye(k, dtype=self.scratch.dtype, device=self.scratch.device)
        return self.eyes[k]

    def gram(self, f: Tensor) -> Tensor:
        return f.mT @ f

    def cholesky(self, gram: Tensor) -> tuple[Tensor, bool]:
        lower, info = torch.linalg.cholesky_ex(gram)
        return lower, info.item() == 0

    def inverse(self, lower: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(lower, self.eye(lower.shape[0]), upper=False)

    def solve(self, m: Tensor, lower: Tensor, lower_inv: Tensor, out: Tensor | None = None) -> Tensor:
        out = self.scratch[: m.numel()].view(m.shape) if out is None else out
        return torch.mm(m, lower_inv.mT, out=out)

    def error(self, gram: Tensor) -> float:
        return torch.dist(gram, self.eye(gram.shape[0])).item()

    def numpy(self, a: Tensor) -> np.ndarray:
        return a.cpu().numpy()


def _condition_at_most(lower: np.ndarray, lower_inv: np.ndarray, max_cond: float) -> bool:
    """Whether κ₂(L) = κ₂(M) is at most `max_cond`, for the Cholesky factor L of MᵀM and its inverse; False
    where either holds Inf or NaN (MᵀM overflowed, or M is not finite).

    First the bound ‖A‖₂ <= sqrt(‖A‖₁‖A‖∞) applied to L and L⁻¹: a few k x k reductions, and within a few
    percent for the near-identity L of a factor after an optimizer step, but up to ~k/5 too high for a
    genuinely ill-conditioned M; only when it is inconclusive, the exact value from the singular values of L.
    """
    a, b = np.abs(lower), np.abs(lower_inv)
    with np.errstate(over="ignore", invalid="ignore"):  # Inf and NaN are answered below
        bound = float(np.sqrt(a.sum(0).max() * a.sum(1).max() * b.sum(0).max() * b.sum(1).max()))
    if bound <= max_cond:
        return True
    if not np.isfinite(bound):
        return False
    sigma = openblas.singular_values(lower)
    return bool(sigma[0] <= max_cond * sigma[-1])


def _retract_one(f: Tensor, steps: _Steps, tol: float, max_cond: float) -> _Retracted | None:
    """Retract one factor in place by CholeskyQR; None hands it to Householder QR, as it then is.

    None leaves f holding M (a failed factorisation, κ(M) above `max_cond`, M or MᵀM not finite) or, short of
    NaN unreachable, the first pass's Q when the second pass cannot factorise its Gram matrix: Householder QR
    of that Q is the same point as of M.
    """
    lower, ok = steps.cholesky(steps.gram(f))
    if not ok:
        return None
    lower_inv = steps.inverse(lower)

    def well_conditioned() -> bool:
        return _condition_at_most(steps.numpy(lower), steps.numpy(lower_inv), max_cond)

    # Falling back needs M. Where Q overwrites it, κ(M) is checked first; where Q is formed beside it, only
    # once one pass has fallen short of `tol`, which after an optimizer step it does not.
    if steps.in_place and not well_conditioned():
        return None
    q = steps.solve(f, lower, lower_inv)
    gram = steps.gram(q)
    error = steps.error(gram)
    if error <= tol:
        if q is not f:
            f.copy_(q)
        return _Retracted(error, second_pass=False)
    if not steps.in_place and not well_conditioned():
        return None
    # Well conditioned, only short of `tol` after one pass: the second pass, on the first pass's Q, into f.
    lower, ok = steps.cholesky(gram)
    if not ok:
        return None
    steps.solve(q, lower, steps.inverse(lower), out=f)
    return _Retracted(steps.error(steps.gram(f)), second_pass=True)


def uses_openblas(f: Tensor) -> bool:
    """Whether `retract_` computes `f` with OpenBLAS's products under torch's compute threads now (a CPU float
    matrix with adjacent columns, of rank `THREADED_MIN_RANK` or more unless torch computes on one thread)."""
    return openblas.supports(f) and (torch.get_num_threads() == 1 or f.shape[1] >= THREADED_MIN_RANK)


def _spread(indices: list[int], factors: Sequence[Tensor], workers: int) -> list[list[int]]:
    """The factors split into `workers` lists of about equal work: largest first, each to the lightest list."""
    lists: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for i in sorted(indices, key=lambda i: -factors[i].numel()):
        lightest = loads.index(min(loads))
        lists[lightest].append(i)
        loads[lightest] += factors[i].numel()
    return lists


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
    for index, f in enumerate(factors):
        if f.ndim != 2:
            raise SctError(f"retraction: factor #{index} has shape {tuple(f.shape)}, expected a 2-D n x k matrix")
        _check_matrix(f, f"retraction: factor #{index}")
    # A named range in torch.profiler traces: OpenBLAS's calls are not torch ops, so it would not see them.
    with torch.profiler.record_function(PROFILER_LABEL):
        return _retract_all([f.detach() for f in factors], tol, max_cond)


def _retract_all(factors: list[Tensor], tol: float | None, max_cond: float | None) -> RetractionResult:
    limits = [
        (DEFAULT_TOL[f.dtype] if tol is None else tol, DEFAULT_MAX_COND[f.dtype] if max_cond is None else max_cond)
        for f in factors
    ]
    outcomes: list[_Retracted | None] = [None] * len(factors)

    def run(indices: list[int], steps: _Steps) -> None:
        for i in indices:
            outcomes[i] = _retract_one(factors[i], steps, *limits[i])

    on_blas = {i for i, f in enumerate(factors) if uses_openblas(f)}
    lists = _spread(sorted(on_blas), factors, min(torch.get_num_threads(), len(on_blas)))
    if len(lists) > 1:
        with ThreadPoolExecutor(max_workers=len(lists) - 1) as pool:
            running = [pool.submit(run, indices, _OpenBlasSteps()) for indices in lists[1:]]
            run(lists[0], _OpenBlasSteps())
            for future in running:
                future.result()
    elif lists:
        run(lists[0], _OpenBlasSteps())
    on_torch = [i for i in range(len(factors)) if i not in on_blas]
    if on_torch:
        # One scratch buffer per dtype and device, as large as the largest of those factors.
        sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        for i in on_torch:
            key = (factors[i].dtype, factors[i].device)
            sizes[key] = max(sizes.get(key, 0), factors[i].numel())
        steps = {key: _TorchSteps(torch.empty(size, dtype=key[0], device=key[1])) for key, size in sizes.items()}
        for i in on_torch:
            run([i], steps[factors[i].dtype, factors[i].device])

    result = RetractionResult(factors=len(factors))
    for index, (f, outcome) in enumerate(zip(factors, outcomes, strict=True)):
        if outcome is None:
            if not bool(torch.isfinite(f).all()):
                raise SctError(f"retraction: factor #{index} ({f.shape[0]} x {f.shape[1]}) holds NaN or Inf")
            result.fallbacks += 1
            f.copy_(householder_retraction(f))
            outcome = _Retracted(orthonormality_error(f), second_pass=False)
        elif index in on_blas:
            torch.autograd.graph.increment_version(f)  # written through its pointer, not by a torch op
        result.second_passes += outcome.second_pass
        result.max_error = max(result.max_error, outcome.error)
    return result
