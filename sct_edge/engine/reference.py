"""The straightforward in-memory step: the whole model in RAM, autograd over the whole graph,
`torch.optim.AdamW`, sign-corrected Householder QR.

It is the yardstick the streamed step is held to: the exactness tests compare every factor, norm and
Adam moment against it, and `sct-edge bench step` times it in the same invocation as the streamed step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sct_edge.engine.adamw import OptimConfig, is_orthonormal_factor, torch_param_groups
from sct_edge.engine.profile import compute_autocast
from sct_edge.model.retraction import householder_retraction
from sct_edge.model.transformer import Transformer, rope_tables


class InMemoryStep:
    def __init__(self, model: Transformer, optim: OptimConfig, workload: str = "lm", fused: bool = False,
                 compute_dtype: str = "float32") -> None:
        self.model = model
        # As the engine: bfloat16 compute runs the forward (and so its backward) under autocast.
        self.autocast = compute_autocast("cpu", compute_dtype)
        self.optim_config = optim
        self.workload = workload
        named = [(n, p) for n, p in model.named_parameters() if workload == "lm" or n.startswith("layers.")]
        self.named = named
        self.optimizer = torch.optim.AdamW(
            torch_param_groups(named, optim), betas=(optim.beta1, optim.beta2), eps=optim.eps,
            fused=fused or None, foreach=None if fused else True,
        )

    def loss(self, x: Tensor, y: Tensor | None) -> Tensor:
        if self.workload == "lm":
            with self.autocast():
                logits = self.model(x)
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        cos, sin = rope_tables(self.model.config, torch.arange(x.shape[1]))
        h = x
        with self.autocast():
            for block in self.model.layers:
                h = block(h, cos, sin)
        return h.float().sum()

    def step(self, micro_batches: list[tuple[Tensor, Tensor | None]]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        total = 0.0
        for x, y in micro_batches:
            loss = self.loss(x, y) / (n if self.workload == "lm" else 1)
            loss.backward()
            total += loss.item()
        if self.optim_config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named], self.optim_config.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            for name, p in self.named:
                if is_orthonormal_factor(name):
                    p.copy_(householder_retraction(p))
        return total

    def moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {n: (self.optimizer.state[p]["exp_avg"], self.optimizer.state[p]["exp_avg_sq"]) for n, p in self.named}
