"""RMSNorm with a backward of a few whole-tensor passes, both directions taken a cache-sized block of rows at a time.

`F.rms_norm` under autograd on the CPU is a composition (pow, mean, rsqrt, mul, mul) whose backward runs each
piece's own backward: about a dozen passes over a tokens × dim tensor, and it saves the normalised input
beside the input. In a recomputing step the block's two norms run with grad once more in backward: on
llama3-8b r128 at 4 × 512 their element-wise passes took about 170 ms of a block's 2.16 s forward,
recompute and backward. `RMSNormFunction` saves only the input and the reciprocal RMS and computes the backward
in closed form:

    y = w ⊙ x̂,  x̂ = x · r,  r = (mean(x²) + eps)^(-1/2)
    ∂x = r · (g ⊙ w − x̂ · mean(g ⊙ w ⊙ x̂)) = r · (g ⊙ w) − x · r³ · mean(g ⊙ w ⊙ x),   ∂w = Σ_tokens g ⊙ x · r

Both directions are still several passes, each at memory speed over a tensor far larger than the cache (32 MiB
for llama3-8b at 4 × 512). So they run a cache-sized block of rows at a time (`accounting.CACHE_BLOCK_BYTES`):
a block is read from memory once and its later passes find it in cache. In one llama3-8b r128 block at 4 × 512
that saved 18–53 ms of its forward, recompute and backward (720–890 ms). The forward is torch's fused kernel's
own composition (`_fused_rms_norm` on the CPU: pow, mean, add, rsqrt, mul, mul), row by row the same
operations, so the result is the same bit for bit. `gradcheck` in float64 checks the backward against the derivative.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sct_edge.model.accounting import rows_per_cache_block


def _chunk_rows(x: Tensor) -> int:
    return rows_per_cache_block(x.shape[-1] * x.element_size())


def _forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The normalised rows of x (rows × dim) and their reciprocal RMS (rows × 1), as `_fused_rms_norm` gives them."""
    step = _chunk_rows(x)
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.shape[0] <= step:
        # One block of rows is the fused kernel's own work in one call. Other dtypes: the fused kernel computes in
        # float32 whatever x's dtype and casts before scaling; let it do that.
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
    y, rstd = torch.empty_like(x), x.new_empty(x.shape[0], 1)
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        r = torch.rsqrt(x[rows].pow(2).mean(-1, keepdim=True).add_(eps), out=rstd[rows])
        torch.mul(x[rows], r, out=y[rows]).mul_(weight)
    return y, rstd


class RMSNormFunction(torch.autograd.Function):
    """rms_norm(x) and, with `pass_x`, x itself as a second output, for a residual stream that x also feeds: the
    residual's gradient then reaches this backward, which adds it to the norm's own while each block of rows is
    in cache, rather than autograd summing the two tokens × dim gradients in a pass of its own."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, pass_x: bool):
        y, rstd = _forward(x.reshape(-1, x.shape[-1]), weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return (y.view_as(x), x.view_as(x)) if pass_x else y.view_as(x)

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_passed: Tensor | None = None):
        x, weight, rstd = ctx.saved_tensors
        dim = x.shape[-1]
        x2, grad2 = x.reshape(-1, dim), grad_y.reshape(-1, dim)
        passed = None if grad_passed is None else grad_passed.reshape(-1, dim)
        r_all = rstd.reshape(-1, 1).to(x.dtype)
        grad_x = torch.empty_like(x2)
        grad_w = x2.new_zeros(dim) if ctx.needs_input_grad[1] else None
        step = _chunk_rows(x2)
        for start in range(0, x2.shape[0], step):
            rows = slice(start, start + step)
            xs, gs, r = x2[rows], grad2[rows], r_all[rows]
            weighted = torch.mul(gs, weight, out=grad_x[rows])
            # ∂x = r·(g ⊙ w − x·r²·mean(g ⊙ w ⊙ x)): the per-token sums as a batch of dot products (a third of the
            # time of a product and a sum), the rest in place, subtracting before scaling as the composition does.
            dots = torch.bmm(weighted.unsqueeze(1), xs.unsqueeze(2)).view(-1, 1)
            weighted.addcmul_(xs, dots * r.square() / dim, value=-1).mul_(r)
            if passed is not None:
                weighted.add_(passed[rows])
            if grad_w is not None:
                grad_w.addmv_((gs * xs).T, r.view(-1))  # Σ_tokens g ⊙ x · r
        return grad_x.view_as(x), None if grad_w is None else grad_w.to(weight.dtype), None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension of x, scaled by `weight` (see the module)."""
    return RMSNormFunction.apply(x, weight, eps, False)


def rms_norm_and_pass(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x), x): use the second where the residual stream needs x, so that one backward takes both
    gradients of x (see `RMSNormFunction`)."""
    return RMSNormFunction.apply(x, weight, eps, True)
