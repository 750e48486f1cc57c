"""The language-model loss over a large vocabulary, a few hundred tokens at a time.

Logits of a whole micro-batch are batch × seq × vocab: at SmolLM2's 49,152-entry vocabulary and 4 × 256
tokens that is 201 MB in float32, and autograd keeps it, its log-softmax and their gradients alive together.
`lm_loss_backward` computes the same mean cross-entropy chunk by chunk over the tokens and backpropagates
each chunk at once, so at most `chunk_tokens` × vocab logits exist at any time, they stay cache-sized, and
the head's parameters accumulate the same gradients as one backward of the full loss. The engine takes its chunk
size from `sct_edge.model.accounting.chunk_tokens_for`, where the memory plan counts the chunk too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # targets that carry no loss (prompts, padding), as in `F.cross_entropy`
def lm_loss_backward(
    h: Tensor, targets: Tensor, logits_fn: Callable[[Tensor], Tensor], scale: float = 1.0,
    chunk_tokens: int | None = None,
) -> tuple[float, Tensor]:
    """`scale` × mean cross-entropy of `logits_fn(h)` against `targets`, and its gradient with respect to `h`.

    `h` is (…, dim) and `targets` the matching (…) token ids, IGNORE_INDEX for tokens without loss; the mean
    is over the other tokens, as `F.cross_entropy` takes it. `logits_fn` maps rows of hidden states to rows
    of logits and must treat each row on its own (a final norm, then the head); the parameters it uses get
    their gradients accumulated into `.grad`, exactly as `loss.backward()` of the full loss would. Returns
    the loss as a float and d loss / d h with the shape of `h`.
    """
    flat_targets = targets.reshape(-1)
    counted = int((flat_targets != IGNORE_INDEX).sum())
    # No token with a loss: the mean is NaN, as F.cross_entropy's would be.
    weight = scale / counted if counted else float("nan")

    def chunk_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        return F.cross_entropy(logits, flat_targets[start:stop], ignore_index=IGNORE_INDEX, reduction="sum") * weight

    return _chunked_backward(h, logits_fn, chunk_loss, chunk_tokens)


def distill_loss_backward(
    h: Tensor, teacher_h: Tensor, logits_fn: Callable[[Tensor], Tensor], scale: float = 1.0,
    chunk_tokens: int | None = None,
) -> tuple[float, Tensor]:
    """`scale` × mean over tokens of KL(p_teacher ‖ p_student), p_teacher = softmax(logits_fn(teacher_h)) and
    p_student = softmax(logits_fn(h)), and its gradient with respect to `h`, as `lm_loss_backward` gives it.

    `teacher_h` (the shape of `h`) holds the teacher's final hidden states; the teacher's logits go through the
    same `logits_fn` (the same final norm and head, which distillation keeps fixed) with no gradient, so only
    a hidden state per token is kept for the teacher, never its logits over the vocabulary.
    """
    teacher_rows = teacher_h.reshape(-1, teacher_h.shape[-1])
    weight = scale / teacher_rows.shape[0]

    def chunk_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        with torch.no_grad():
            target = _float32(logits_fn(teacher_rows[start:stop])).log_softmax(-1)
        return F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="sum") * weight

    return _chunked_backward(h, logits_fn, chunk_loss, chunk_tokens)


def _float32(logits: Tensor) -> Tensor:
    """bfloat16 compute: the loss in float32."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunked_backward(
    h: Tensor, logits_fn: Callable[[Tensor], Tensor], chunk_loss: Callable[[Tensor, int, int], Tensor],
    chunk_tokens: int | None,
) -> tuple[float, Tensor]:
    """Σ over chunks of rows of `chunk_loss(logits of rows start:stop, start, stop)`, each chunk backpropagated
    at once; the total as a float and its gradient with respect to `h`."""
    rows = h.detach().reshape(-1, h.shape[-1])
    step = chunk_tokens or rows.shape[0]
    grad = torch.empty_like(rows)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for start in range(0, rows.shape[0], step):
        stop = min(start + step, rows.shape[0])
        piece = rows[start:stop].detach().requires_grad_()
        loss = chunk_loss(_float32(logits_fn(piece)), start, stop)
        loss.backward()
        total += loss.detach()
        grad[start:stop] = piece.grad
    return float(total), grad.view_as(h)
