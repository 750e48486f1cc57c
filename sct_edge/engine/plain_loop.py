"""A plain PyTorch training loop of the dense model: the yardstick for speed at real batch sizes.

What anyone would write first: the whole dense model in RAM (every matrix an `nn.Linear`, SDPA attention),
autograd over the whole graph, cross-entropy over the full logits, `torch.optim.AdamW` with foreach (after
`clip_grad_norm_` when the benchmark clips, as `sct-edge run` does by default), in float32 or under bfloat16
autocast, every product on torch's own BLAS (`torch_products`). No factors, no retraction, no paging.
`sct-edge bench step --engine all` times it in the same invocation as the streamed and in-memory spectral
steps, so their ratios to it are free of the machine's load drift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sct_edge.engine.profile import compute_autocast
from sct_edge.model.config import ModelConfig
from sct_edge.model.products import torch_products
from sct_edge.model.transformer import Transformer


class PlainLoop:
    """One optimizer step of the dense model per call: forward, backward, AdamW (foreach)."""

    def __init__(self, config: ModelConfig, lr: float = 1e-4, seed: int = 0, clip: float | None = None,
                 compute_dtype: str = "float32") -> None:
        self.model = Transformer(config, spectral=False, seed=seed)
        self.clip = clip
        self.autocast = compute_autocast("cpu", compute_dtype)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, foreach=True)

    def step(self, micro_batches: list[tuple[Tensor, Tensor]]) -> float:
        """Gradients accumulated over the micro-batches (mean loss), then one AdamW step; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for tokens, targets in micro_batches:
            with self.autocast(), torch_products():
                logits = self.model(tokens)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) / len(micro_batches)
                loss.backward()
            total += loss.item()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return total
