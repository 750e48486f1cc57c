"""Output-aware truncation: the rank-k factors of W that best keep its outputs on calibration text, and the
spreading of ranks across matrices by what each stored number buys.

For W (out x in) and C = Σ x xᵀ over the matrix's inputs, the best rank-k W′ in ‖(W − W′) X‖_F is
W′ = P_k P_kᵀ W with P_k the top-k left singular vectors of W S, where S Sᵀ = C (SVD-LLM, Swift-SVD
Theorem 3.1): ‖A X‖²_F = tr(A C Aᵀ) = ‖A S‖²_F for any A, so the problem is Eckart-Young on W S, and the
projection P_k P_kᵀ (W S) = (P_k P_kᵀ W) S is reached by a W′ of rank k. S = Q Λ^{1/2} comes from
`eigh(C) = Q Λ Qᵀ` in float64 with the eigenvalues clamped at 0: no Cholesky, no inverse, and a singular C
(fewer tokens than inputs, dead features) does no harm. The factors come from the SVD of the small k x in
matrix P_kᵀ W = Q′ Σ Zᵀ: V = P_k Q′, s = Σ, U = Z, so U and V are orthonormal and the result is an ordinary
spectral layer. Everything reported is exact without building W′:
- output energy kept: Σ_{j<=k} σ_j² / Σ σ_j² over the singular values σ of W S (the dropped ones are the
  output error, ‖(W − W′) X‖² = Σ_{j>k} σ_j²);
- weight energy kept: ‖W′‖² / ‖W‖² = Σ s² / ‖W‖², since W′ is an orthogonal projection of W's columns.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sct_edge.errors import SctError

ROW_CHUNK = 4096  # rows of W turned to float64 at a time: no float64 copy of a whole 14336 x 4096 matrix


def covariance_root(c: Tensor) -> Tensor:
    """S (n x n, float64) with S Sᵀ = C for a symmetric positive semi-definite C: Q Λ^{1/2} from eigh."""
    lam, q = torch.linalg.eigh(c.to(torch.float64))
    return q * lam.clamp_min(0.0).sqrt()


def weight_norm2(w: Tensor) -> float:
    """‖W‖²_F in float64, a block of rows at a time."""
    return float(sum(float((part.to(torch.float64) ** 2).sum()) for part in w.split(ROW_CHUNK)))


def weight_gram(w: Tensor) -> Tensor:
    """Wᵀ W (in x in, float64), a block of rows of W at a time."""
    total = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64)
    for part in w.split(ROW_CHUNK):
        part = part.to(torch.float64)
        total.addmm_(part.T, part)
    return total


def times_w(a: Tensor, w: Tensor) -> Tensor:
    """A W in float64 for A (k x out) and W (out x in), a block of W's columns at a time."""
    a = a.to(torch.float64)
    return torch.cat([a @ part.to(torch.float64) for part in w.split(ROW_CHUNK, dim=1)], dim=1)


@dataclass
class OutputSpectrum:
    """The SVD of W S for one matrix: what any rank of it would keep, before a rank is chosen.

    The left singular vectors are held as `P` (out x r) when they come from an out x out eigenproblem; for a
    matrix with more outputs than inputs they are W S Z σ⁻¹ for the right singular vectors Z, so `SZ` = S Z
    (in x r) is held instead and `vectors(w, k)` builds only the k that are asked for."""

    P: Tensor | None  # out x r, left singular vectors of W S (float64); None when only the values were asked for
    sigma: Tensor  # r, its singular values, descending (float64)
    weight_norm2: float  # ‖W‖²_F
    SZ: Tensor | None = None  # in x r (float64): S Z, for the wide matrices

    def vectors(self, w: Tensor, rank: int) -> Tensor:
        """P_k (out x rank, float64, orthonormal columns), the leading left singular vectors of W S."""
        if self.P is not None:
            return self.P[:, :rank]
        if self.SZ is None:
            raise SctError("this output spectrum was computed without its vectors")
        # W S z_j = σ_j p_j. A column whose σ is (close to) zero has no direction of its own: any unit vector
        # orthogonal to the others keeps the same outputs, and the QR below supplies one (Householder QR gives
        # orthonormal columns whatever the input); elsewhere it only removes rounding.
        sigma = self.sigma[:rank]
        tiny = sigma <= sigma[0] * 1e-7 if sigma.numel() and sigma[0] > 0 else torch.ones_like(sigma, dtype=bool)
        p = times_w(self.SZ[:, :rank].T, w.T).T / torch.where(tiny, torch.ones_like(sigma), sigma)
        p[:, tiny] = 0.0
        q, r = torch.linalg.qr(p)
        signs = torch.sign(torch.diagonal(r))
        return q * torch.where(signs == 0, torch.ones_like(signs), signs)

    def output_energy(self, rank: int) -> float:
        total = float((self.sigma**2).sum())
        return 1.0 if total == 0.0 else min(1.0, float((self.sigma[:rank] ** 2).sum()) / total)

    def rank_for_output_energy(self, energy: float) -> int:
        """Smallest rank keeping at least `energy` of the output energy Σσ²."""
        power = self.sigma**2
        total = power.sum()
        if total == 0:
            return 1
        kept = torch.cumsum(power, 0) / total
        k = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1
        return min(k, self.sigma.numel())


class CovarianceRoot:
    """C and, computed once when first asked for, its root S: shared by the matrices that read one input."""

    def __init__(self, c: Tensor) -> None:
        self.c = c.to(torch.float64)
        self._root: Tensor | None = None

    @property
    def root(self) -> Tensor:
        if self._root is None:
            self._root = covariance_root(self.c)
        return self._root


def gram_spectrum(gram: Tensor, w_norm2: float, vectors: bool = True) -> OutputSpectrum:
    """The spectrum of W S from its output Gram (W S)(W S)ᵀ = W C Wᵀ (out x out): eigenvectors P, eigenvalues σ²."""
    gram = gram.to(torch.float64)
    gram = (gram + gram.T) / 2  # exactly symmetric for eigh
    if vectors:
        lam, p = torch.linalg.eigh(gram)
        p = p.flip(1)
    else:
        lam, p = torch.linalg.eigvalsh(gram), None
    return OutputSpectrum(p, lam.flip(0).clamp_min(0.0).sqrt(), w_norm2)


def output_spectrum(w: Tensor, cov: CovarianceRoot, vectors: bool = True) -> OutputSpectrum:
    """The left singular vectors (with `vectors`) and singular values of W S, S Sᵀ = C the input covariance.

    A matrix with no more outputs than inputs takes them from `eigh(W C Wᵀ)` (out x out): (W S)(W S)ᵀ = W C Wᵀ,
    so its eigenvectors are P and its eigenvalues σ², with no square root of C at all (`gram_spectrum`; the
    MLP's down projection gets its W C Wᵀ straight from its outputs, `calibration.staged_forward`, and its
    ffn x ffn C is never formed). A wider output (gate, up: 14336 x 4096 in an 8B model) takes the eigenproblem
    on the input side instead, (W S)ᵀ(W S) = Sᵀ Wᵀ W S = Z diag(σ²) Zᵀ (in x in), with S = Q Λ^{1/2} from
    eigh(C) shared by the matrices that read the same input; its left vectors are W S Z σ⁻¹, built for the
    kept rank only (`OutputSpectrum.vectors`), so nothing out x in is ever held in float64 for them (W is turned
    to float64 a block of rows at a time).
    """
    n_out, n_in = w.shape
    if n_out <= n_in:
        wc = torch.cat([part.to(torch.float64) @ cov.c for part in w.split(ROW_CHUNK)])  # W C (out x in)
        gram = times_w(wc, w.T)  # W C Wᵀ
        del wc
        return gram_spectrum(gram, weight_norm2(w), vectors)
    s = cov.root
    m = (s.T @ weight_gram(w)) @ s  # (W S)ᵀ (W S), in x in; eigh reads one triangle, so no symmetrising copy
    if vectors:
        lam, z = torch.linalg.eigh(m)
        sz = s @ z.flip(1)
    else:
        lam, sz = torch.linalg.eigvalsh(m), None
    sigma = lam.flip(0).clamp_min(0.0).sqrt()
    return OutputSpectrum(None, sigma, weight_norm2(w), sz)


@dataclass
class OutputAwareFactors:
    """Output-aware factors of one matrix in sct-edge layout, with what they keep."""

    U: Tensor  # in x k
    s: Tensor  # k
    V: Tensor  # out x k
    output_energy: float  # output energy kept on the calibration inputs
    weight_energy: float  # ‖W′‖² / ‖W‖²

    @property
    def rank(self) -> int:
        return int(self.s.numel())


def output_aware_factors(w: Tensor, spectrum: OutputSpectrum, rank: int) -> OutputAwareFactors:
    """W′ = P_k P_kᵀ W factored as U diag(s) Vᵀ (float32), for W (out x in) and its `spectrum` under C."""
    n_out, n_in = w.shape
    if not 1 <= rank <= min(n_out, n_in):
        raise SctError(f"rank {rank} is outside 1..{min(n_out, n_in)} for a {n_out} x {n_in} matrix")
    p_k = spectrum.vectors(w, rank)
    q, sigma, zt = torch.linalg.svd(times_w(p_k.T, w), full_matrices=False)
    kept = float((sigma**2).sum())
    weight_energy = 1.0 if spectrum.weight_norm2 == 0.0 else min(1.0, kept / spectrum.weight_norm2)
    return OutputAwareFactors(
        zt.T.contiguous().float(),
        sigma.float(),
        (p_k @ q).contiguous().float(),
        spectrum.output_energy(rank),
        weight_energy,
    )


# ---------------------------------------------------------------------------------------- rank allocation


@dataclass
class RankCandidate:
    """One matrix competing for stored numbers: its shape and the relative output error each rank removes."""

    path: str
    shape: tuple[int, int]  # (out, in)
    gains: Tensor  # σ_j² / Σσ², descending: the relative output error removed by rank j + 1

    @property
    def cost(self) -> int:
        """Stored numbers one more rank costs: a column of U, a column of V and one s."""
        return self.shape[0] + self.shape[1] + 1

    @property
    def full_rank(self) -> int:
        return min(self.shape)


def uniform_rank(shape: tuple[int, int], ratio: float) -> int:
    """The rank at which a matrix stores `ratio` times the numbers of its dense form (at least 1, at most full)."""
    n_out, n_in = shape
    return max(1, min(min(shape), math.floor(ratio * n_out * n_in / (n_out + n_in + 1))))


def allocate_ranks(candidates: list[RankCandidate], budget: int, floor_fraction: float = 0.5) -> dict[str, int]:
    """Ranks whose stored numbers Σ k(in + out + 1) fit `budget`, spread by output error per stored number.

    Every matrix first gets its floor, `floor_fraction` of the rank a uniform split of the budget would give it
    (so no matrix collapses); the rest goes, one rank at a time, to the matrix whose next singular value
    removes the most relative output error per stored number. The gains of a matrix fall with its rank, so
    this greedy choice is the exact optimum of the relaxed problem over the ranks above the floors.
    """
    dense = sum(c.shape[0] * c.shape[1] for c in candidates)
    ratio = budget / dense
    ranks = {c.path: min(c.full_rank, max(1, math.floor(floor_fraction * uniform_rank(c.shape, ratio))))
             for c in candidates}
    left = budget - sum(ranks[c.path] * c.cost for c in candidates)
    if left < 0:
        raise SctError(f"a budget of {budget:,} stored numbers does not cover the rank floors of the matrices")
    heap = [(-float(c.gains[ranks[c.path]]) / c.cost, i) for i, c in enumerate(candidates)
            if ranks[c.path] < c.full_rank]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        c = candidates[i]
        if c.cost > left:
            continue  # a cheaper matrix may still fit
        ranks[c.path] += 1
        left -= c.cost
        if ranks[c.path] < c.full_rank:
            heapq.heappush(heap, (-float(c.gains[ranks[c.path]]) / c.cost, i))
    return ranks
