"""What a block's first forward hands to its recompute, so that backward does not redo the costly parts.

A recomputing step runs each block's forward twice: under `no_grad` in forward, keeping only the block's input,
and again in backward, with grad, to rebuild the graph it backpropagates through. Three parts of that second
forward compute what the first one already had, and what their backward needs of it is small:

- attention: the flash kernel's backward needs q, k and v (rebuilt cheaply from rank-wide products) and the
  forward's output and log-sum-exp (tokens × dim and tokens × heads; `sct_edge/model/attention.py`'s, where it
  is routed, the output alone). The first forward records those;
  the recompute skips the attention kernel and `ReplayedAttention` hands them to the kernel's backward.
  On llama3-8b r128 at 4 × 512 the kernel is about a tenth of a block's forward + recompute + backward.
- the rank-wide products of spectral q, k, v and o with their inputs (`SharedInputProjections` in
  `sct_edge/model/spectral.py`; tokens × k each): the recompute replays them instead of multiplying a
  tokens × dim input by U again, and their backward still gets the input and U it needs.
- the SwiGLU MLP in FFN slices (`sct_edge/model/swiglu.py`): its backward keeps gate's and up's rank-wide
  projections of x and down's rank-wide accumulator (tokens × k each), and recomputes the FFN-wide slices
  anyway. The first forward records the three; the recompute skips every slice, about half of a spectral
  block's forward products.

Given the same input and weights, the recompute would produce exactly what the memo holds, so a step with
memos equals one without, bit for bit. The memory plan decides which blocks record one
(`MemoryPlan.memo_layers`) and counts what they hold (`block_memo_tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sct_edge.model import attention
from sct_edge.model.accounting import MEMO_ALIGN_BYTES


class MemoArena:
    """Memory for a step's memos: one buffer, allocated at the first step and reused by every later one.

    Memos are many tensors, some of the hidden states' size, that live from a block's forward to its backward.
    Taken from malloc's heap, which serves the hidden-state tensors when nothing is paged, they pin chunks among
    the tensors the heap recycles: on llama3-8b r128 at 4 × 512 the peak rose 1.05 GiB above the plan and
    forward ran 2.9 s slower, about what the memos saved in backward. One buffer, larger than malloc's mmap
    threshold, stays out of the heap, and reused from step to step it is faulted in once.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.buffer: Tensor | None = None
        self.used = 0

    def reset(self) -> None:
        """Start a step: the previous step's memos are all replayed and released."""
        self.used = 0

    def keep(self, t: Tensor) -> Tensor:
        """A copy of `t` in the arena, with its strides; a copy from the allocator when the arena is full or `t`
        is not dense (neither happens with the plan's sizes)."""
        size = t.numel() * t.element_size()
        start = -(-self.used // MEMO_ALIGN_BYTES) * MEMO_ALIGN_BYTES
        span = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
        if span != t.numel() or start + size > self.nbytes:
            return t.detach().clone()
        if self.buffer is None or self.buffer.device != t.device:
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=t.device)
        kept = self.buffer[start : start + size].view(t.dtype).as_strided(t.shape, t.stride())
        kept.copy_(t)
        self.used = start + size
        return kept


@dataclass
class BlockMemo:
    """One block's memo for one micro-batch: empty until the first forward records it, then replayed."""

    # the flash kernel's output and log-sum-exp, or `sct_edge/model/attention.py`'s output and None
    attention: tuple[Tensor, Tensor | None] | None = None
    qkv_in: tuple[Tensor, ...] | None = None  # x·U of spectral q, k and v (`SharedInputProjections`)
    o_in: tuple[Tensor] | None = None  # the attention output · U of a spectral o
    mlp: tuple[Tensor, Tensor, Tensor] | None = None  # x·U of gate and up, and down's rank-wide accumulator
    arena: MemoArena | None = None  # where the recorded tensors are kept (else where they were computed)

    def keep(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The tensors to record, in the arena when there is one."""
        if self.arena is None:
            return tuple(t.detach() for t in tensors)
        return tuple(self.arena.keep(t) for t in tensors)


class ReplayedAttention(torch.autograd.Function):
    """Causal attention whose forward returns a recorded output and whose backward is the recording kernel's own."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor | None) -> Tensor:
        ctx.save_for_backward(q, k, v, out, lse)
        return out.view_as(out)  # a fresh alias: the graph attaches to it, not to the memo's tensor

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        if lse is None:  # recorded by sct_edge/model/attention.py
            grad_q, grad_k, grad_v = attention.backward(grad_out, q, k, v, out)
        else:
            grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, q, k, v, out, lse, 0.0, True)
        return grad_q, grad_k, grad_v, None, None


def replays_attention(q: Tensor) -> bool:
    """Whether attention over q can record and replay: the flash kernel it replays is the CPU one."""
    return q.device.type == "cpu"


def causal_attention(q: Tensor, k: Tensor, v: Tensor, memo: BlockMemo) -> Tensor:
    """Causal attention (batch × heads × seq × head_dim; k and v may have fewer heads) that the first forward
    records into `memo` and the recompute replays from it; the same kernel the block runs without a memo
    (torch's flash kernel, or `sct_edge/model/attention.py` where it is routed), so the values are the same."""
    if memo.attention is None:
        if attention.routed(q, k.shape[1]):
            out = attention.CausalAttention.apply(q, k, v)  # differentiable, as the flash op is, should grad be on
            memo.attention = (*memo.keep(out), None)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
            memo.attention = memo.keep(out, lse)
        return out
    return ReplayedAttention.apply(q, k, v, *memo.attention)
