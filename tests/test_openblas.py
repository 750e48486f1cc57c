"""The OpenBLAS routines the retraction calls equal torch's own products and factorisations."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sct_edge.model import openblas

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _matrix(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(n, k, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _lower(k: int, dtype: torch.dtype, seed: int) -> np.ndarray:
    """A well-conditioned lower-triangular matrix with a positive diagonal."""
    m = _matrix(k, k, dtype, seed)
    return (torch.tril(m, -1) * 0.1 + torch.diag(1.0 + m.diagonal().abs())).numpy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_lower_is_the_lower_triangle_of_ftf_and_honours_a_row_stride(dtype):
    storage = _matrix(300, 24, dtype, seed=1)
    f = storage[:, 5:17]  # rows 24 apart in memory
    assert openblas.supports(f)
    g = openblas.gram_lower(f)
    assert g.dtype == f.numpy().dtype and g.shape == (12, 12)
    expected = torch.tril(f.mT @ f).numpy()
    np.testing.assert_allclose(g, expected, rtol=0, atol=TOL[dtype] * 300)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multiply_lower_transposed_is_f_times_the_transpose_in_place(dtype):
    storage = _matrix(200, 20, dtype, seed=2)
    before = storage.clone()
    f = storage[:, 2:10]
    lower = _lower(8, dtype, seed=3)
    expected = f @ torch.from_numpy(lower).mT
    pointer = f.data_ptr()
    openblas.multiply_lower_transposed_(f, lower)
    assert f.data_ptr() == pointer
    torch.testing.assert_close(f, expected, rtol=0, atol=TOL[dtype] * 10)
    # The columns around the slice are untouched.
    assert torch.equal(storage[:, :2], before[:, :2]) and torch.equal(storage[:, 10:], before[:, 10:])


def test_avx512_kernels_are_chosen_for_sct_edges_copy_only():
    """On a CPU with AVX-512 the library loads with SkylakeX kernels even where OPENBLAS_CORETYPE asks for
    Haswell (as on the machines this is built on), and the variable is back as it was for numpy's and scipy's."""
    code = "import os; from sct_edge.model import openblas; print(openblas.core(), os.environ['OPENBLAS_CORETYPE'])"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OPENBLAS_CORETYPE": "Haswell"},
                          check=True, capture_output=True, text=True)
    core, after = done.stdout.split()
    assert after == "Haswell"
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert core == "SkylakeX"


@pytest.mark.parametrize("dtype", DTYPES)
def test_cholesky_inverse_and_singular_values_equal_torch(dtype):
    a = _matrix(40, 9, dtype, seed=4)
    gram = (a.mT @ a).numpy()
    lower, info = openblas.cholesky_lower(np.tril(gram))  # only the lower triangle is read
    assert info == 0
    torch.testing.assert_close(torch.from_numpy(lower), torch.linalg.cholesky(torch.from_numpy(gram)),
                               rtol=TOL[dtype], atol=TOL[dtype])
    inverse = openblas.inverse_lower(lower)
    torch.testing.assert_close(torch.from_numpy(inverse), torch.linalg.inv(torch.from_numpy(lower)),
                               rtol=TOL[dtype], atol=TOL[dtype])
    sigma = openblas.singular_values(lower)
    torch.testing.assert_close(torch.from_numpy(sigma), torch.linalg.svdvals(torch.from_numpy(lower).double()),
                               rtol=1e-6, atol=1e-6)


def test_cholesky_reports_a_matrix_that_is_not_positive_definite():
    _, info = openblas.cholesky_lower(np.diag([1.0, -1.0, 2.0]).astype(np.float32))
    assert info == 2


@pytest.mark.parametrize(
    "f,ok",
    [
        (torch.zeros(10, 3), True),
        (torch.zeros(10, 3, dtype=torch.float64), True),
        (torch.zeros(10, 8)[:, 2:5], True),  # a column slice: rows strided, columns adjacent
        (torch.zeros(3, 10).mT, False),  # column-major
        (torch.zeros(10, 6)[:, ::2], False),  # columns not adjacent
        (torch.zeros(10, 3, dtype=torch.bfloat16), False),
    ],
)
def test_supports_only_row_major_float_cpu_matrices(f, ok):
    assert openblas.supports(f) is ok


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_equals_torch_and_goes_back_to_one_thread(dtype, threads):
    a, b = _matrix(70, 33, dtype, seed=5), _matrix(33, 41, dtype, seed=6)
    out = torch.empty(70, 41, dtype=dtype)
    assert openblas.gemm(a, b, out, threads) is out
    torch.testing.assert_close(out, a @ b, rtol=TOL[dtype], atol=TOL[dtype] * 10)
    assert openblas.threads() == 1


def test_gemm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="matching shapes"):
        openblas.gemm(torch.zeros(3, 4), torch.zeros(5, 2), torch.zeros(3, 2))
