"""SwiGLU's fused element-wise kernels (`sct_edge/model/fused.py`): built here, equal to torch's ops, in place."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sct_edge.model import fused


def torch_silu_mul_backward(g, u, grad_p):
    """The three results by autograd through silu(g) * u."""
    g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
    p = F.silu(g) * u
    grad_g, grad_u = torch.autograd.grad(p, (g, u), grad_p)
    return grad_g, p.detach(), grad_u


def inputs(n: int, dtype: torch.dtype, scale: float = 4.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return [torch.randn(n, generator=generator, dtype=dtype) * scale for _ in range(3)]


def test_the_library_builds_wherever_a_c_compiler_is_found():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: torch's ops stand in")
    assert fused.available()


# Sizes: one element, a vector's remainder, and past the threads' threshold with a remainder.
@pytest.mark.parametrize("n", [1, 37, 3 * 65536 + 5])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-14), (torch.float32, 2e-6)])
def test_the_kernels_equal_torch_and_write_over_their_inputs(n, dtype, tolerance):
    if not fused.available():
        pytest.skip("no C compiler: nothing to compare")
    g, u, grad_p = inputs(n, dtype)
    expected = torch_silu_mul_backward(g, u, grad_p)
    got = fused.silu_mul_backward_(*(t.clone() for t in (g, u, grad_p)))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    kept = [g.clone(), u.clone(), grad_p.clone()]
    results = fused.silu_mul_backward_(*kept)
    assert [r.data_ptr() for r in results] == [t.data_ptr() for t in kept]  # nothing allocated

    forward = g.clone()
    assert fused.silu_mul_(forward, u).data_ptr() == forward.data_ptr()
    torch.testing.assert_close(forward, F.silu(g) * u, rtol=tolerance, atol=tolerance)


def test_extreme_inputs_stay_finite_and_a_nan_reaches_every_output():
    if not fused.available():
        pytest.skip("no C compiler: nothing to compare")
    g = torch.tensor([-1e4, -200.0, -88.5, -30.0, 0.0, 30.0, 88.5, 200.0, 1e4, float("nan")] * 4)
    u, grad_p = torch.full_like(g, 0.5), torch.full_like(g, -2.0)
    got = fused.silu_mul_backward_(g.clone(), u.clone(), grad_p.clone())
    expected = torch_silu_mul_backward(g, u, grad_p)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-30, equal_nan=True)
    assert all(bool(r[9::10].isnan().all()) for r in got)
    torch.testing.assert_close(fused.silu_mul_(g.clone(), u), F.silu(g) * u, rtol=1e-6, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("case", ["bfloat16", "strided", "requires_grad"])
def test_what_the_kernels_do_not_take_goes_to_torchs_ops(case):
    g, u, grad_p = inputs(64, torch.float32)
    if case == "bfloat16":
        g, u, grad_p = (t.bfloat16() for t in (g, u, grad_p))
    elif case == "strided":
        g, u, grad_p = (t.view(8, 8).T for t in (g, u, grad_p))
    else:
        g.requires_grad_()
    assert fused._kernel("silu_mul_backward", (g, u, grad_p)) is None
    expected = torch_silu_mul_backward(g, u, grad_p)
    got = fused.silu_mul_backward_(*(t.detach().clone() for t in (g, u, grad_p)))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_without_a_working_compiler_torchs_ops_stand_in(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a compiler that fails every build
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fused._library.cache_clear()
    try:
        assert not fused.available()
        g, u, grad_p = inputs(100, torch.float32)
        got = fused.silu_mul_backward_(g.clone(), u.clone(), grad_p.clone())
        for a, b in zip(got, torch_silu_mul_backward(g, u, grad_p), strict=True):
            torch.testing.assert_close(a, b)
        assert not list(tmp_path.rglob("*.so"))
    finally:
        fused._library.cache_clear()


def test_the_kernels_share_torchs_openmp_runtime():
    """A second OpenMP runtime's threads would compete with torch's for the cores."""
    if not fused.available():
        pytest.skip("no C compiler: no library to load")
    script = ("import torch; from sct_edge.model import fused; assert fused.available();"
              "print(len(fused.openmp_runtime_paths()))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
