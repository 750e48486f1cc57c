"""The Stiefel retraction: CholeskyQR lands on sign-corrected Householder QR, falls back when it must."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sct_edge.errors import SctError
from sct_edge.model.retraction import (
    RetractionResult,
    householder_retraction,
    orthonormality_error,
    retract_,
    uses_openblas,
)

SHAPES = [(16, 4), (64, 8), (200, 16), (33, 33)]
DTYPES = [torch.float32, torch.float64]
# Orthonormality and agreement with Householder: the float32 targets of the brief, and float64 ones that
# an accidental float32 round trip would miss.
ORTHO_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
MATCH_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _orthonormal(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Row-major, as the trainer's factors are (so `retract_` computes with OpenBLAS)."""
    g = torch.Generator().manual_seed(seed)
    return householder_retraction(torch.randn(n, k, dtype=torch.float64, generator=g)).to(dtype).contiguous()


def _adamw_step(u: torch.Tensor, lr: float, seed: int) -> torch.Tensor:
    """A real AdamW step on a random quadratic loss: every entry moves by about lr."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(u.shape, dtype=u.dtype, generator=g)
    p = torch.nn.Parameter(u.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.01)
    ((p - target) ** 2).sum().backward()
    opt.step()
    return p


def _ill_conditioned(n: int, k: int, cond: float, seed: int) -> torch.Tensor:
    """float32 n x k with singular values from 1 down to 1/cond and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    left = householder_retraction(torch.randn(n, k, dtype=torch.float64, generator=g))
    right = householder_retraction(torch.randn(k, k, dtype=torch.float64, generator=g))
    sigma = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return ((left * sigma) @ right.T).float()


@pytest.fixture(params=["openblas", "torch"])
def products(request) -> str:
    """Which products `retract_` uses for a test's narrow row-major factors: OpenBLAS's when torch computes on
    one thread, torch's general products on two (see `THREADED_MIN_RANK`)."""
    torch.set_num_threads(1 if request.param == "openblas" else 2)
    return request.param


def test_householder_retraction_is_q_with_positive_r_diagonal():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 20, 5, dtype=torch.float64, generator=g)
    q = householder_retraction(m)
    assert q.shape == m.shape
    assert orthonormality_error(q) < 1e-13
    r = q.mT @ m  # the R of m = q r
    assert torch.allclose(r, r.triu(), atol=1e-12)
    assert (torch.diagonal(r, dim1=-2, dim2=-1) > 0).all()
    # Batched and one-at-a-time agree.
    for i in range(3):
        torch.testing.assert_close(householder_retraction(m[i]), q[i], rtol=0, atol=1e-13)


def test_householder_retraction_zero_column_gets_positive_sign():
    m = torch.zeros(6, 2, dtype=torch.float64)
    m[:, 0] = torch.arange(1.0, 7.0)
    q = householder_retraction(m)
    assert orthonormality_error(q) < 1e-13
    assert torch.allclose(q[:, 0], m[:, 0] / m[:, 0].norm())


def test_orthonormality_error_is_frobenius_distance_from_identity():
    m = torch.zeros(2, 5, 3)
    m[0, :3] = torch.eye(3)
    m[1, :3] = 2 * torch.eye(3)  # mᵀm − I = 3 I, Frobenius norm 3·√3
    assert orthonormality_error(m) == pytest.approx(3 * 3**0.5)
    assert orthonormality_error(m[:1]) == 0.0


@pytest.mark.parametrize("row_major", [True, False], ids=["openblas", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_retraction_after_adamw_step_matches_householder(n, k, dtype, row_major):
    """Row-major factors take OpenBLAS's products (narrow ones when torch computes on one thread); column-major
    ones, like factors on other devices, torch's."""
    torch.set_num_threads(1)
    u = _orthonormal(n, k, dtype, seed=n + k)
    p = _adamw_step(u if row_major else u.mT.contiguous().mT, lr=0.1, seed=n * k)
    assert uses_openblas(p) is row_major
    moved = p.detach().clone()
    assert orthonormality_error(moved) > 0.1  # the step really left the manifold

    ptr = p.data_ptr()
    result = retract_([p])  # a leaf that requires grad, as the trainer hands it over

    assert p.data_ptr() == ptr and p.requires_grad
    assert result.factors == 1 and result.fallbacks == 0
    assert orthonormality_error(p) <= ORTHO_TOL[dtype]
    assert (p.detach() - householder_retraction(moved)).abs().max().item() <= MATCH_TOL[dtype]
    assert result.max_error == pytest.approx(orthonormality_error(p), abs=ORTHO_TOL[dtype])


@pytest.mark.usefixtures("products")
def test_moderately_conditioned_input_takes_the_second_pass():
    """κ = 50: one CholeskyQR pass leaves ~eps·κ² off the manifold, the second pass fixes it."""
    m = _ill_conditioned(64, 8, cond=50.0, seed=1)
    f = m.clone()
    result = retract_([f])
    assert result.second_passes == 1 and result.fallbacks == 0
    assert orthonormality_error(f) <= 1e-5
    assert (f - householder_retraction(m)).abs().max().item() <= 1e-5


@pytest.mark.usefixtures("products")
def test_tol_zero_forces_the_second_pass_everywhere():
    fs = [_adamw_step(_orthonormal(40, 6, torch.float32, seed=i), lr=0.05, seed=i).detach() for i in range(3)]
    moved = [f.clone() for f in fs]
    result = retract_(fs, tol=0.0)
    assert result.second_passes == 3
    for f, m in zip(fs, moved, strict=True):
        assert (f - householder_retraction(m)).abs().max().item() <= 1e-5


@pytest.mark.usefixtures("products")
@pytest.mark.parametrize("cond", [1e4, 1e6])
def test_ill_conditioned_input_falls_back_to_householder(cond):
    good = [_adamw_step(_orthonormal(48, 6, torch.float32, seed=i), 0.1, seed=i).detach() for i in range(3)]
    bad = _ill_conditioned(48, 6, cond=cond, seed=7)
    factors = [good[0], bad, good[1], good[2]]
    inputs = [f.clone() for f in factors]

    result = retract_(factors)

    assert result.fallbacks == 1  # only the one that needs it
    for f, m in zip(factors, inputs, strict=True):
        assert orthonormality_error(f) <= 1e-5
        # The last column of the κ = 1e6 input is mostly rounding noise in float32; the others are defined.
        assert (f[:, :-1] - householder_retraction(m)[:, :-1]).abs().max().item() <= 1e-5


@pytest.mark.usefixtures("products")
def test_rank_deficient_input_falls_back_and_stays_orthonormal():
    m = _orthonormal(30, 5, torch.float32, seed=3) + 0.01
    m[:, 3] = m[:, 1]  # exactly dependent columns: the Gram matrix is singular
    m[:, 4] = 0.0
    f = m.clone()
    result = retract_([f])
    assert result.fallbacks == 1
    assert orthonormality_error(f) <= 1e-5
    assert (f[:, :3] - householder_retraction(m)[:, :3]).abs().max().item() <= 1e-5


@pytest.mark.usefixtures("products")
def test_mixed_list_equals_one_at_a_time():
    specs = [
        (32, 4, torch.float32),
        (48, 8, torch.float32),
        (32, 4, torch.float32),
        (32, 4, torch.float64),
        (40, 4, torch.float32),
        (48, 8, torch.float32),
        (32, 4, torch.float64),
        (32, 4, torch.float32),
    ]
    factors = [
        _adamw_step(_orthonormal(n, k, dt, seed=i), lr=0.1, seed=100 + i).detach() for i, (n, k, dt) in enumerate(specs)
    ]
    singles = [f.clone() for f in factors]

    together = retract_(factors)
    errors = [retract_([s]).max_error for s in singles]

    assert together.factors == len(specs) and together.fallbacks == 0
    assert together.max_error == pytest.approx(max(errors), rel=1e-6)
    for f, s in zip(factors, singles, strict=True):
        assert (f - s).abs().max().item() <= 1e-6
        assert orthonormality_error(f) <= 1e-5


@pytest.mark.usefixtures("products")
def test_non_contiguous_views_are_retracted_in_place():
    storage = torch.zeros(64, 20, dtype=torch.float64)
    block = storage[:, 4:12]  # a column slice: rows are strided
    moved = _adamw_step(_orthonormal(64, 8, torch.float64, seed=5), lr=0.1, seed=6).detach()
    block.copy_(moved)
    transposed = torch.empty(8, 64, dtype=torch.float64).mT  # column-major factor
    transposed.copy_(moved)

    retract_([block, transposed])

    expected = householder_retraction(moved)
    assert (storage[:, 4:12] - expected).abs().max().item() <= 1e-10
    assert (transposed - expected).abs().max().item() <= 1e-10
    assert storage[:, :4].abs().max() == 0 and storage[:, 12:].abs().max() == 0


def test_empty_list():
    assert retract_([]) == RetractionResult(max_error=0.0, factors=0, fallbacks=0, second_passes=0)


@pytest.mark.parametrize(
    "factor,message",
    [
        (torch.randn(5), "expected a 2-D"),
        (torch.randn(2, 4, 3), "expected a 2-D"),
        (torch.randn(3, 5), "rows >= columns"),
        (torch.zeros(4, 3, dtype=torch.int64), "float32 and float64"),
        (torch.randn(6, 2, dtype=torch.bfloat16), "float32 and float64"),
    ],
)
def test_bad_factors_are_sct_errors(factor, message):
    with pytest.raises(SctError, match=message):
        retract_([torch.randn(6, 2), factor])


@pytest.mark.usefixtures("products")
def test_non_finite_factor_is_an_error_naming_it():
    ok = torch.randn(10, 3)
    bad = torch.randn(10, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(SctError, match=r"factor #1 \(10 x 3\) holds NaN or Inf"):
        retract_([ok, bad])


def test_householder_retraction_rejects_wide_matrices():
    with pytest.raises(SctError, match="rows >= columns"):
        householder_retraction(torch.randn(2, 3))


@pytest.mark.usefixtures("products")
def test_finite_factor_whose_gram_overflows_falls_back():
    m = _adamw_step(_orthonormal(20, 3, torch.float32, seed=8), lr=0.1, seed=9).detach() * 1e20
    f = m.clone()
    result = retract_([f])  # MᵀM is Inf in float32, M itself is fine: Householder handles it
    assert result.fallbacks == 1
    assert orthonormality_error(f) <= 1e-5
    assert (f - householder_retraction(m)).abs().max().item() <= 1e-5


def test_bench_retraction_runs_and_reports_agreement():
    """The benchmark script on the real sct-70b shapes at a tiny rank: one layer, one run (no timing claims)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            str(root / "tools" / "bench_retraction"),
            "--ranks",
            "2",
            "--layers",
            "1",
            "--repeats",
            "1",
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    report = json.loads(out)
    (row,) = report["results"]
    assert report["preset"] == "sct-70b" and row["rank"] == 2 and row["factors"] == 14
    assert row["fast_s"] > 0 and row["householder_s"] > 0 and row["fallbacks"] == 0
    assert row["max_abs_diff"] <= 1e-5 and row["max_orthonormality_error"] <= 1e-5


def test_openblas_and_torch_products_land_on_the_same_point():
    """A row-major factor takes OpenBLAS's products, a column-major view of the same values torch's."""
    torch.set_num_threads(2)
    moved = _adamw_step(_orthonormal(160, 64, torch.float32, seed=11), lr=0.1, seed=12).detach()
    on_blas = moved.clone()
    on_torch = torch.empty(64, 160).mT
    on_torch.copy_(moved)
    assert uses_openblas(on_blas) and not uses_openblas(on_torch)

    first, second = retract_([on_blas]), retract_([on_torch])

    assert first.fallbacks == second.fallbacks == 0
    assert (on_blas - on_torch).abs().max().item() <= 1e-6
    assert (on_blas - householder_retraction(moved)).abs().max().item() <= 1e-5
    assert first.max_error == pytest.approx(second.max_error, abs=1e-6)


def test_the_result_does_not_depend_on_the_number_of_threads():
    """Each factor is one single-threaded OpenBLAS computation, whichever thread runs it: bit for bit."""
    factors = [
        _adamw_step(_orthonormal(n, 64, torch.float32, seed=n), lr=0.05, seed=n + 1).detach()
        for n in (64, 200, 80, 128, 96)
    ]
    results = {}
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        assert all(uses_openblas(f) for f in factors)
        work = [f.clone() for f in factors]
        results[threads] = (retract_(work), work)
    for threads in (2, 3):
        assert results[threads][0] == results[1][0]
        for a, b in zip(results[threads][1], results[1][1], strict=True):
            assert torch.equal(a, b)


def test_a_factor_written_by_openblas_has_its_version_bumped():
    """In-place writes through the data pointer are still visible to autograd's saved-tensor checks."""
    p = torch.nn.Parameter(_adamw_step(_orthonormal(128, 64, torch.float32, seed=13), lr=0.1, seed=14).detach())
    assert uses_openblas(p)
    before = p._version
    retract_([p])
    assert p._version > before
