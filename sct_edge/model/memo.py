"""What a block's first forward hands to its recompute, so that backward does not redo the costly parts.

A recomputing step runs each block's forward twice: under `no_grad` in forward, keeping only the block's input,
and again in backward, with grad, to rebuild the graph it backpropagates through. Two parts of that second
forward compute what the first one already had, and what their backward needs of it is small:

- attention: the flash kernel's backward needs q, k and v (rebuilt cheaply from rank-wide products) and the
  forward's output and log-sum-exp (tokens × dim and tokens × heads). The first forward records those two;
  the recompute skips the attention kernel and `ReplayedAttention` hands them to the kernel's backward.
  On llama3-8b r128 at 4 × 512 the kernel is about a tenth of a block's forward + recompute + backward.
- the SwiGLU MLP in FFN slices (`sct_edge/model/swiglu.py`): its backward keeps gate's and up's rank-wide
  projections of x and down's rank-wide accumulator (tokens × k each), and recomputes the FFN-wide slices
  anyway. The first forward records the three; the recompute skips every slice, about half of a spectral
  block's forward products.

Given the same input and weights, the recompute would produce exactly what the memo holds, so a step with
memos equals one without, bit for bit. The memory plan decides which blocks record one
(`MemoryPlan.memo_layers`) and counts what they hold (`block_memo_elements`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class BlockMemo:
    """One block's memo for one micro-batch: empty until the first forward records it, then replayed."""

    attention: tuple[Tensor, Tensor] | None = None  # the flash kernel's output and log-sum-exp
    mlp: tuple[Tensor, Tensor, Tensor] | None = None  # x·U of gate and up, and down's rank-wide accumulator


class ReplayedAttention(torch.autograd.Function):
    """Causal attention whose forward returns a recorded output and whose backward is the flash kernel's own."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> Tensor:
        ctx.save_for_backward(q, k, v, out, lse)
        return out.view_as(out)  # a fresh alias: the graph attaches to it, not to the memo's tensor

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, True)
        return grad_q, grad_k, grad_v, None, None


def replays_attention(q: Tensor) -> bool:
    """Whether attention over q can record and replay: the flash kernel it replays is the CPU one."""
    return q.device.type == "cpu"


def causal_attention(q: Tensor, k: Tensor, v: Tensor, memo: BlockMemo) -> Tensor:
    """Causal attention (batch × heads × seq × head_dim; k and v may have fewer heads) that the first forward
    records into `memo` and the recompute replays from it; the same kernel `F.scaled_dot_product_attention`
    runs on the CPU for these inputs, so the values are the same."""
    if memo.attention is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        memo.attention = (out.detach(), lse.detach())
        return out
    return ReplayedAttention.apply(q, k, v, *memo.attention)
