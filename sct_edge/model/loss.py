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
    rows = h.detach().reshape(-1, h.shape[-1])
    flat_targets = targets.reshape(-1)
    counted = int((flat_targets != IGNORE_INDEX).sum())
    # No token with a loss: the mean is NaN, as F.cross_entropy's would be.
    weight = scale / counted if counted else float("nan")
    step = chunk_tokens or rows.shape[0]
    grad = torch.empty_like(rows)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for start in range(0, rows.shape[0], step):
        piece = rows[start : start + step].detach().requires_grad_()
        logits = logits_fn(piece)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bfloat16 compute: loss in float32
        loss = F.cross_entropy(logits, flat_targets[start : start + step], ignore_index=IGNORE_INDEX,
                               reduction="sum") * weight
        loss.backward()
        total += loss.detach()
        grad[start : start + step] = piece.grad
    return float(total), grad.view_as(h)
