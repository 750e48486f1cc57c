"""RMSNorm with a backward of a few whole-tensor passes.

`F.rms_norm` under autograd on the CPU is a composition (pow, mean, rsqrt, mul, mul) whose backward runs each
piece's own backward: about a dozen passes over a tokens × dim tensor, and it saves the normalised input
beside the input. In a recomputing step the block's two norms run with grad once more in backward: on
llama3-8b r128 at 4 × 512 their element-wise passes took about 170 ms of a block's 2.16 s forward,
recompute and backward. `RMSNormFunction` runs the forward as torch's fused kernel, which also returns the
reciprocal RMS, saves only the input and that, and computes the backward in closed form:

    y = w ⊙ x̂,  x̂ = x · r,  r = (mean(x²) + eps)^(-1/2)
    ∂x = r · (g ⊙ w − x̂ · mean(g ⊙ w ⊙ x̂)),   ∂w = Σ_tokens g ⊙ x̂

`gradcheck` in float64 checks it against the derivative.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        normalised = x * rstd.to(x.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * normalised).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        weighted = grad_y * weight
        mean = (weighted * normalised).mean(-1, keepdim=True)
        grad_x = torch.addcmul(weighted, normalised, mean, value=-1).mul_(rstd.to(x.dtype))
        return grad_x, grad_w, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension of x, scaled by `weight` (see the module)."""
    return RMSNormFunction.apply(x, weight, eps)
