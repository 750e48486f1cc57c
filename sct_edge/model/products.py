"""The step's float32 matrix products on the CPU's own GEMM: oneDNN, inside torch, where torch's BLAS falls short.

torch sends a float32 `mm` to MKL, and MKL runs AVX2 code on AMD CPUs: on an AMD Zen 5 with AVX-512 it
reached 174–194 GFLOP/s on 2 threads, where the same CPU's AVX-512 GEMM (OpenBLAS, or oneDNN) reached
360–426 (docs/benchmarks.md, "The CPU's GEMM peak is not torch's"). torch already carries oneDNN, which
picks its kernels by the CPU's instruction set and not its vendor; `torch.ops.mkldnn._linear_pointwise(x, w,
None, "none", [], "")` is its plain `x wᵀ` on ordinary dense tensors (the op torch.compile's CPU backend
emits). So on CPUs where torch reports AVX-512, every float32 product of the step large enough to pay for
oneDNN's ~10 µs a call goes there; elsewhere, and for other dtypes, autocast or small products, `torch.mm`
as before. `use_onednn(False)` (or `--gemm torch` on `sct-edge bench step`) turns the route off for a process.

oneDNN wants the left operand row-major and the right one (`w`) row- or column-major; `linear` copies either
to that layout when it is not. A product with a transposed left operand, such as a weight gradient xᵀg, is
computed as (gᵀ x)ᵀ = `linear(gᵀ, xᵀ)ᵀ` with gᵀ copied to rows: the smaller copy of the two orders is taken
(`transposed_product`). The results differ from torch's in summation order only (float32 rounding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

# Below about 2²⁰ multiply-adds oneDNN's call (10–13 µs against torch's 4–9 µs at 8 × 64 × 64) costs more than
# its faster kernel saves; from 32 × 256 × 256 on it was faster (scratch measurements, 2 threads).
MIN_MACS = 1 << 20


def onednn_available() -> bool:
    """Whether torch's oneDNN has AVX-512 kernels for this CPU, where it beats MKL's float32 GEMM on AMD."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX"))


_enabled = onednn_available()


def use_onednn(enabled: bool) -> None:
    """Route the step's large float32 products through oneDNN (True: only where `onednn_available()`)."""
    global _enabled
    _enabled = enabled and onednn_available()


def uses_onednn() -> bool:
    return _enabled


@contextmanager
def torch_products() -> Iterator[None]:
    """Every product on torch's own BLAS while inside (the plain loop: what anyone would write)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _routed(x: Tensor, w: Tensor) -> bool:
    """Whether x wᵀ goes to oneDNN: float32 CPU matrices outside autocast, large enough to pay for the call."""
    return (_enabled and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and w.dim() == 2 and x.shape[0] * x.shape[1] * w.shape[0] >= MIN_MACS
            and not torch.is_autocast_enabled("cpu"))


def linear(x: Tensor, w: Tensor, add: Tensor | None = None) -> Tensor:
    """x wᵀ (+ `add`, of the result's shape and dtype) for 2-D x (m × k) and w (n × k); no autograd.

    `add` is summed by `addmm` on torch; on oneDNN into the fresh result in place, which beat oneDNN's own
    binary-add epilogue (llama3-8b's 2,048 × 128 × 4,096 with a 32 MiB addend: 6.6 against 7.8 ms; equal or
    faster at every shape tried, 2 threads). A transposed view as w costs nothing (`linear(g, U)` is g Uᵀ,
    `linear(x, U.T)` is x U)."""
    if _routed(x, w) and (add is None or add.dtype == x.dtype):
        x = x if x.is_contiguous() else x.contiguous()
        if not (w.is_contiguous() or w.T.is_contiguous()):
            # oneDNN takes a w with rows further apart than its width hundreds of times slower (365 against
            # 0.35 ms for 512 × 128 × 512, w a head's keys in a batch × seq × heads × head_dim tensor).
            w = w.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return out if add is None else out.add_(add)
    if add is None:
        return x @ w.T
    return torch.addmm(add, x, w.T)


def accumulate_linear(acc: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """acc + x wᵀ for acc of the result's shape and x's dtype, summed into acc in place (`addmm_` on torch;
    oneDNN's product, then an in-place add). Returns acc."""
    if _routed(x, w):
        return acc.add_(linear(x, w))
    return acc.addmm_(x, w.T)


def rows_of_transpose(t: Tensor) -> Tensor | None:
    """tᵀ copied to rows for `transposed_product`'s `b_t` where float32 products go to oneDNN; None where they do
    not (torch's BLAS reads a transposed operand without a copy)."""
    return t.T.contiguous() if _enabled and t.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") else None


def transposed_product(a: Tensor, b: Tensor, b_t: Tensor | None = None) -> Tensor:
    """aᵀ b for a (m × n) and b (m × k), the n × k result possibly as a transposed view; no autograd.

    On oneDNN one operand is copied transposed to rows: a (giving aᵀ b directly) or b (giving (bᵀ a)ᵀ), the
    smaller copy; `b_t`, bᵀ already in rows, saves that copy when a loop reuses b."""
    if not _routed(a.T, b.T):
        return a.T @ b
    m, n, k = a.shape[0], a.shape[1], b.shape[1]
    if b_t is None and m * n <= m * k + n * k:
        return linear(a.T.contiguous(), b.T)
    return linear(b.T.contiguous() if b_t is None else b_t, a.T).T


class _Product(torch.autograd.Function):
    """x wᵀ (+ add) with `linear` in forward and backward: x's gradient g w, w's gradient gᵀ x in w's layout."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, add: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        return linear(x, w, add)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        grad_x = linear(grad, w.T) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            # w is often a factor's transposed view (x U is product(x, U.T)): its gradient comes back in the
            # factor's own row-major layout, so autograd need not copy it. A row-major w's gradient may come
            # back as a transposed view: autograd copies it to w's layout the first time and later sums read it
            # where it lies, so the head's vocabulary-sized gradient, summed over the loss's chunks, skips a
            # transposing copy a chunk (128,256 × 128: a strided add 12 ms against a copy and an add 17–28 ms).
            grad_w = (transposed_product(grad, x) if w.is_contiguous()
                      else transposed_product(x, grad).contiguous().T)
        return grad_x, grad_w, grad if ctx.needs_input_grad[2] else None


def product(x: Tensor, w: Tensor, add: Tensor | None = None) -> Tensor:
    """x wᵀ (+ `add`) with autograd, for x (…, k) and w (n × k): `F.linear` whose float32 products, forward and
    backward, take oneDNN where it is routed. Otherwise torch's `x @ w.T`, with `add` folded in by `addmm` when
    all three share a dtype outside autocast, else added after it in the promoted dtype (a float32 residual
    stream stays float32 under bfloat16 autocast)."""
    same_dtype = x.dtype == w.dtype and (add is None or add.dtype == x.dtype)
    if torch.is_autocast_enabled(x.device.type) or not same_dtype:
        return x @ w.T if add is None else add + x @ w.T
    flat, flat_add = x.reshape(-1, x.shape[-1]), None if add is None else add.reshape(-1, w.shape[0])
    if _enabled and x.dtype == torch.float32:
        out = _Product.apply(flat, w, flat_add)
    elif add is None:
        return x @ w.T
    else:
        out = torch.addmm(flat_add, flat, w.T)
    return out.view(*x.shape[:-1], w.shape[0])
