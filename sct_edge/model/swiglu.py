"""The SwiGLU MLP of spectral matrices, computed a slice of the FFN width at a time.

`down(silu(gate(x)) * up(x))` with gate, up and down all spectral (W = U diag(s) Vᵀ). Written as autograd
sees it, every FFN-wide tensor (gate's and up's outputs, the SiLU, the product and, in backward, each of
their gradients) is tokens × ffn: 117 MB apiece for llama3-8b at 2,048 tokens. Each one is a fresh mmap
(glibc serves anything above 32 MiB that way) that the kernel zeroes and faults in, and each element-wise
pass over it runs at memory speed: a profile of llama3-8b r128 at 4 × 512 spent 14 of its 98 s in the
MLP's `mul`, `silu` and their backward, and its k → ffn products ran at half the GEMM peak.

The rank structure makes a slice-wise evaluation cheap. Gate and up first project x to their ranks
(`x U * s`, tokens × k); the FFN-wide part only starts at the products with Vᵀ, and down projects back to its
rank at once (`· U_down`). So `SpectralSwiGLU` takes the FFN width `chunk` columns at a time: the slice's
gate and up outputs, its SiLU product and its contribution to the tokens × k accumulator stay cache-sized,
and no FFN-wide tensor is ever built. Backward recomputes each slice's gate and up outputs from the saved
rank-k projections (the products a recomputing step redoes anyway) and accumulates every gradient slice by
slice. It saves x and three tokens × k tensors for backward instead of five tokens × ffn ones. A slice's
element-wise work (the SiLU, its product with up, and their gradients) is one pass written over the slice's own
tensors (`sct_edge/model/fused.py`). The result equals the plain composition to rounding; `gradcheck` in float64
checks the gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sct_edge.model import accounting
from sct_edge.model.fused import silu_mul_, silu_mul_backward_
from sct_edge.model.memo import BlockMemo
from sct_edge.model.products import accumulate_linear, linear, rows_of_transpose, transposed_product
from sct_edge.model.spectral import rank_out


class SpectralSwiGLU(torch.autograd.Function):
    """y = (silu(x W_gᵀ) * (x W_uᵀ)) W_dᵀ for spectral W = U diag(s) Vᵀ, over FFN slices (see the module).

    The products run in `dtype` (bfloat16 under the engine's autocast, which does not reach inside a custom
    Function); the rank-wide sums over slices (down's accumulator and gate's and up's input gradients)
    accumulate in float32 or wider, and every gradient is returned in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, residual, U_g, s_g, V_g, U_u, s_u, V_u, U_d, s_d, V_d, chunk, dtype, memo):  # noqa: N803 (the factors' names)
        inputs = (x, U_g, s_g, V_g, U_u, s_u, V_u, U_d, s_d, V_d)
        ctx.input_dtypes = [t.dtype for t in inputs]
        x, U_g, s_g, V_g, U_u, s_u, V_u, U_d, s_d, V_d = (t.to(dtype) for t in inputs)  # noqa: N806
        if memo is not None and memo.mlp is not None:
            x_g, x_u, acc = memo.mlp  # a recompute: the first forward's slices gave these (model/memo.py)
        else:
            x_g, x_u = linear(x, U_g.T), linear(x, U_u.T)  # tokens × k: what backward recomputes the slices from
            a_g, a_u = x_g * s_g, x_u * s_u
            acc = x.new_zeros(x.shape[0], U_d.shape[1], dtype=_accumulator(dtype))
            for c in range(0, V_g.shape[0], chunk):
                p = silu_mul_(linear(a_g, V_g[c : c + chunk]), linear(a_u, V_u[c : c + chunk]))
                acc.add_(linear(p, U_d[c : c + chunk].T))
            if memo is not None:
                memo.mlp = memo.keep(x_g, x_u, acc)
        ctx.save_for_backward(x, x_g, x_u, acc, U_g, s_g, V_g, U_u, s_u, V_u, U_d, s_d, V_d)
        ctx.chunk = chunk
        ctx.residual_dtype = None if residual is None else residual.dtype
        return rank_out(acc.to(dtype) * s_d, V_d, residual)

    @staticmethod
    def backward(ctx, grad_y):
        x, x_g, x_u, acc, U_g, s_g, V_g, U_u, s_u, V_u, U_d, s_d, V_d = ctx.saved_tensors  # noqa: N806
        dtype = x.dtype
        grad_residual = None if ctx.residual_dtype is None else grad_y.to(ctx.residual_dtype)
        grad_y = grad_y.to(dtype)
        a_g, a_u = x_g * s_g, x_u * s_u
        acc_c = acc.to(dtype)
        grad_V_d = transposed_product(grad_y, acc_c * s_d).contiguous()
        b = linear(grad_y, V_d.T)
        grad_s_d = (b * acc_c).sum(0)
        grad_acc = b * s_d
        grad_U_d, grad_V_g, grad_V_u = torch.empty_like(U_d), torch.empty_like(V_g), torch.empty_like(V_u)
        grad_a_g, grad_a_u = torch.zeros_like(acc), torch.zeros_like(acc)  # rank-wide, like acc
        # The slices' weight gradients are (slice-wide)ᵀ × (rank-wide): on oneDNN the rank-wide operand goes
        # transposed to rows once here rather than in every slice (`transposed_product`).
        grad_acc_t, a_u_t, a_g_t = (rows_of_transpose(t) for t in (grad_acc, a_u, a_g))
        for c in range(0, V_g.shape[0], ctx.chunk):
            cols = slice(c, c + ctx.chunk)
            grad_g, p, grad_u = silu_mul_backward_(
                linear(a_g, V_g[cols]), linear(a_u, V_u[cols]), linear(grad_acc, U_d[cols]))
            grad_U_d[cols] = transposed_product(p, grad_acc, grad_acc_t)
            grad_V_u[cols] = transposed_product(grad_u, a_u, a_u_t)
            grad_V_g[cols] = transposed_product(grad_g, a_g, a_g_t)
            grad_a_u.add_(linear(grad_u, V_u[cols].T))
            grad_a_g.add_(linear(grad_g, V_g[cols].T))
        grad_a_g, grad_a_u = grad_a_g.to(dtype), grad_a_u.to(dtype)
        grad_s_g, grad_s_u = (grad_a_g * x_g).sum(0), (grad_a_u * x_u).sum(0)
        grad_x_g, grad_x_u = grad_a_g * s_g, grad_a_u * s_u
        # one x-sized gradient, as in SharedInputProjections
        grad_x = accumulate_linear(linear(grad_x_g, U_g), grad_x_u, U_u)
        grad_U_g, grad_U_u = (transposed_product(x, grad).contiguous() for grad in (grad_x_g, grad_x_u))
        grads = (grad_x, grad_U_g, grad_s_g, grad_V_g, grad_U_u, grad_s_u, grad_V_u, grad_U_d, grad_s_d, grad_V_d)
        grads = tuple(g.to(d) for g, d in zip(grads, ctx.input_dtypes, strict=True))
        return grads[0], grad_residual, *grads[1:], None, None, None


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """Sums over FFN slices: float32 for half-precision products, the products' own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def slices_pay_off(x: Tensor, ffn: int) -> bool:
    """Whether the MLP of input x (…, dim) with `ffn` hidden units runs in slices (see `mlp_in_slices`)."""
    return accounting.mlp_in_slices(x.numel() // x.shape[-1], ffn, x.element_size())


def spectral_swiglu(x: Tensor, gate, up, down, chunk: int = accounting.MLP_SLICE_COLUMNS,
                    memo: BlockMemo | None = None, residual: Tensor | None = None) -> Tensor:
    """down(silu(gate(x)) * up(x)) for spectral gate, up and down (U, s, V each), over FFN slices; x is (…, dim).
    Plus `residual` (…, dim) when given, folded into down's last product where it can be (`rank_out`).

    Under autocast the products take autocast's dtype, as a plain composition's would. An empty `memo` records
    the rank-wide tensors backward keeps; a recorded one replaces the slices of the forward with them."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    flat = x.reshape(-1, x.shape[-1])
    with torch.autocast(device, enabled=False):
        y = SpectralSwiGLU.apply(flat, None if residual is None else residual.reshape(-1, residual.shape[-1]),
                                 gate.U, gate.s, gate.V, up.U, up.s, up.V, down.U, down.s, down.V, chunk, dtype, memo)
    return y.view(*x.shape[:-1], y.shape[-1])
