"""The few BLAS and LAPACK routines torch does not expose, from OpenBLAS (the `scipy-openblas32` package).

The retraction needs a Gram matrix (`syrk`) and a triangular product (`trmm`) on tall, thin factors: each is
half the arithmetic of the general matrix product torch offers for the same job. torch's own MKL exports
neither, and MKL 2026.2 (the `mkl` package) runs both slower than its GEMM on AMD CPUs. Plus the small LAPACK
steps on k x k matrices (`potrf`, `trtri`, `gesdd`). A triangular solve (`trsm`) would spare forming L⁻¹, but
OpenBLAS's AVX-512 `trsm` runs at a fifth of its `trmm` (35 against 179 GFLOP/s on one core here).

Threads. The library is set to one thread when this module loads: callers parallelise across factors with
their own Python threads, which ctypes lets run concurrently (it releases the GIL for the length of each
call). OpenBLAS's own thread pool would contend with torch's OpenMP threads for the same cores: measured on
2 cores, its workers, still spinning after a call, slowed the torch work that followed by a quarter.

Every function takes row-major operands: a torch CPU tensor for the n x k factor (unit column stride, any
row stride) and C-contiguous numpy arrays of the factor's dtype for the k x k matrices.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

_ROW_MAJOR, _LOWER, _NO_TRANS, _TRANS, _RIGHT, _NON_UNIT = 101, 122, 111, 112, 142, 131  # CBLAS's enums
# LAPACKE on row-major input transposes it in and out; a row-major lower triangle is the column-major upper one,
# so the k x k routines are called column-major on the transpose, which is the same memory.
_COL_MAJOR = 102
# OpenBLAS picks its kernels when the library loads, from OPENBLAS_CORETYPE or else the CPU, and it takes an
# AMD Zen 5 (family 0x1A) for a Haswell (the machines sct-edge is built on also set OPENBLAS_CORETYPE=Haswell):
# AVX2 kernels. Its AVX-512 (SkylakeX) kernels ran syrk 1.6x, trmm 2.1x and GEMM 1.75x faster on one core of
# such a machine (sct-70b's 28,672 x 128 factors). This copy of OpenBLAS is sct-edge's alone, so on a CPU
# with AVX-512 (as torch detects it) it loads with the SkylakeX kernels whatever OPENBLAS_CORETYPE says; the
# variable is changed only for the length of the load, so numpy's and scipy's copies still follow it.
_CORETYPE = "OPENBLAS_CORETYPE"


def _load() -> tuple[ctypes.CDLL, str]:
    before = os.environ.get(_CORETYPE)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        os.environ[_CORETYPE] = "SKYLAKEX"
    try:
        import scipy_openblas32  # its import loads the library: the kernels are chosen here

        path = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True))
        prefix = re.search(r"-DBLAS_SYMBOL_PREFIX=(\w+)", scipy_openblas32.get_pkg_config()).group(1)
    finally:
        if before is None:
            os.environ.pop(_CORETYPE, None)
        else:
            os.environ[_CORETYPE] = before
    return ctypes.CDLL(path), prefix


_LIB, _PREFIX = _load()
_SET_THREADS = _LIB[f"{_PREFIX}openblas_set_num_threads"]
_GET_THREADS = _LIB[f"{_PREFIX}openblas_get_num_threads"]
_GET_THREADS.restype = ctypes.c_int
_SET_THREADS(1)  # see "Threads" above; `gemm` alone asks for more, for the length of a call

_INT, _PTR, _CHAR = ctypes.c_int, ctypes.c_void_p, ctypes.c_char
_SCALAR = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_LETTER = {torch.float32: "s", torch.float64: "d"}
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _routine(name: str, argtypes: list) -> Callable[..., int | None]:
    function = _LIB[f"{_PREFIX}{name}"]
    function.argtypes = argtypes
    function.restype = _INT if name.startswith("LAPACKE") else None
    return function


_SYRK = {
    d: _routine(f"cblas_{_LETTER[d]}syrk", [_INT] * 5 + [_SCALAR[d], _PTR, _INT, _SCALAR[d], _PTR, _INT])
    for d in _SCALAR
}
_TRMM = {
    d: _routine(f"cblas_{_LETTER[d]}trmm", [_INT] * 7 + [_SCALAR[d], _PTR, _INT, _PTR, _INT])
    for d in _SCALAR
}
_GEMM = {
    d: _routine(f"cblas_{_LETTER[d]}gemm", [_INT] * 6 + [_SCALAR[d], _PTR, _INT, _PTR, _INT, _SCALAR[d], _PTR, _INT])
    for d in _SCALAR
}
_POTRF = {d: _routine(f"LAPACKE_{_LETTER[d]}potrf", [_INT, _CHAR, _INT, _PTR, _INT]) for d in _SCALAR}
_TRTRI = {d: _routine(f"LAPACKE_{_LETTER[d]}trtri", [_INT, _CHAR, _CHAR, _INT, _PTR, _INT]) for d in _SCALAR}
_CORE_NAME = _LIB[f"{_PREFIX}openblas_get_corename"]
_CORE_NAME.restype = ctypes.c_char_p
_GESDD = _routine("LAPACKE_dgesdd", [_INT, _CHAR, _INT, _INT, _PTR, _INT, _PTR, _PTR, _INT, _PTR, _INT])


def supports(f: Tensor) -> bool:
    """Whether `f` (n x k) can be handed to these routines as it is: a float32/float64 CPU matrix whose
    columns are adjacent in memory (rows may be strided, as in a column slice of a larger matrix)."""
    return (
        f.device.type == "cpu" and f.dtype in _SCALAR and f.ndim == 2 and f.stride(1) == 1 and f.stride(0) >= f.shape[1]
    )


def gram_lower(f: Tensor) -> np.ndarray:
    """fᵀf (k x k, f's dtype); only its lower triangle is computed, the upper one is zero."""
    n, k = f.shape
    g = np.zeros((k, k), dtype=_NUMPY[f.dtype])
    _SYRK[f.dtype](_ROW_MAJOR, _LOWER, _TRANS, k, n, 1.0, f.data_ptr(), f.stride(0), 0.0, g.ctypes.data, k)
    return g


def multiply_lower_transposed_(f: Tensor, lower: np.ndarray) -> None:
    """f := f Lᵀ in place, for a lower-triangular k x k L (the retraction passes L⁻¹: f L⁻ᵀ)."""
    n, k = f.shape
    _TRMM[f.dtype](
        _ROW_MAJOR, _RIGHT, _LOWER, _TRANS, _NON_UNIT, n, k, 1.0, lower.ctypes.data, k, f.data_ptr(), f.stride(0)
    )


def cholesky_lower(g: np.ndarray) -> tuple[np.ndarray, int]:
    """(L, info) with L Lᵀ = g, for g as `gram_lower` returns it (the lower triangle, zeros above); info != 0
    where g is not numerically positive definite."""
    lower = g.copy()
    info = _POTRF[_dtype(g)](_COL_MAJOR, b"U", g.shape[0], lower.ctypes.data, g.shape[0])
    return lower, info


def inverse_lower(lower: np.ndarray) -> np.ndarray:
    """L⁻¹ of a lower-triangular L with a nonzero diagonal (lower triangular too)."""
    inverse = lower.copy()
    info = _TRTRI[_dtype(lower)](_COL_MAJOR, b"U", b"N", lower.shape[0], inverse.ctypes.data, lower.shape[0])
    if info != 0:
        raise ValueError(f"inverse_lower: the diagonal of L is zero at {info}")
    return inverse


def gemm(a: Tensor, b: Tensor, out: Tensor, threads: int = 1) -> Tensor:
    """out := a b for contiguous CPU float matrices, on `threads` of OpenBLAS's own threads (one again after).

    For measuring what the machine's GEMM reaches (`tools/gemm_peaks`), not for the step: more than one thread
    starts OpenBLAS's pool, whose threads spin on the cores after the call.
    """
    (m, k), (k2, n) = a.shape, b.shape
    if not (k == k2 and out.shape == (m, n) and a.dtype == b.dtype == out.dtype and a.dtype in _SCALAR
            and all(t.is_contiguous() and t.device.type == "cpu" for t in (a, b, out))):
        raise ValueError(f"gemm: contiguous CPU float matrices of matching shapes, got {a.shape} {b.shape} {out.shape}")
    _SET_THREADS(threads)
    try:
        _GEMM[a.dtype](_ROW_MAJOR, _NO_TRANS, _NO_TRANS, m, n, k, 1.0, a.data_ptr(), k, b.data_ptr(), n, 0.0,
                       out.data_ptr(), n)
    finally:
        _SET_THREADS(1)
    return out


def threads() -> int:
    """OpenBLAS's own thread count (one, outside `gemm`)."""
    return _GET_THREADS()


def core() -> str:
    """The kernels OpenBLAS runs (its core name: SkylakeX, Haswell, ...)."""
    return _CORE_NAME().decode()


def singular_values(a: np.ndarray) -> np.ndarray:
    """The singular values of a square matrix, in float64, largest first."""
    work = np.array(a, dtype=np.float64, order="C")
    k = work.shape[0]
    sigma = np.empty(k, dtype=np.float64)
    unused = np.empty(1, dtype=np.float64)
    # Column-major: those of the transpose, which are the same.
    info = _GESDD(_COL_MAJOR, b"N", k, k, work.ctypes.data, k, sigma.ctypes.data, unused.ctypes.data, 1,
                  unused.ctypes.data, 1)
    if info != 0:
        raise ValueError(f"singular_values: gesdd did not converge (info {info})")
    return sigma


def _dtype(a: np.ndarray) -> torch.dtype:
    return torch.float32 if a.dtype == np.float32 else torch.float64
