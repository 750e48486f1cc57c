"""DiLoCo (Douillard et al., arXiv 2311.08105): replicas train alone for H steps, then meet once.

Over a slow link (Wi-Fi, the internet) exchanging every block's gradients every step costs more than the
step. With `--sync-every H` each replica takes H ordinary local steps (its own AdamW moments, its own data
slice); then the replicas average their change since the last meeting, Δ = anchor − local, and an outer
Nesterov-momentum SGD step moves the anchor (the weights all replicas last agreed on):

    m ← μ·m + Δ̄;   anchor ← anchor − η·(Δ̄ + μ·m)

after which U and V are retracted onto the Stiefel manifold, and every replica continues from the new
anchor. Communication falls by a factor H. As in the per-step exchange, each shard's outer step is taken by
its owner, which broadcasts the result, so the replicas leave every meeting bit-identical. The outer state,
anchor and momentum, lives in the store (shards `NAME.outer`, float32) and is committed with it, so a run
stopped between meetings resumes exactly; the owner's momentum is the one that counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sct_edge.engine.adamw import is_orthonormal_factor
from sct_edge.model.retraction import retract_
from sct_edge.parallel.replicas import ReplicaSync
from sct_edge.store.shard_names import outer_shard

if TYPE_CHECKING:
    from sct_edge.engine.step import Engine


@dataclass(frozen=True)
class DilocoConfig:
    sync_every: int  # H: local steps between meetings
    outer_lr: float = 0.7  # η, the paper's value
    outer_momentum: float = 0.9  # μ, Nesterov


@torch.no_grad()
def outer_update(
    anchor: dict[str, Tensor], mean_delta: dict[str, Tensor], momentum: dict[str, Tensor], config: DilocoConfig,
    factors: list[str],
) -> dict[str, Tensor]:
    """The new anchor of one shard from the replicas' mean change; `momentum` is updated in place.

    `factors` names the orthonormal U/V tensors, which are retracted after the step.
    """
    new = {}
    for key, start in anchor.items():
        delta = mean_delta[key].to(momentum[key].dtype)
        momentum[key].mul_(config.outer_momentum).add_(delta)
        step = delta + config.outer_momentum * momentum[key]
        new[key] = (start.float() - config.outer_lr * step.float()).to(start.dtype).contiguous()
    if factors:
        retract_([new[k] for k in factors])
    return new


class OuterSync:
    """The replicas' meeting: every shard's outer step, taken by its owner and broadcast to the others."""

    def __init__(self, config: DilocoConfig, sync: ReplicaSync) -> None:
        self.config = config
        self.sync = sync

    def due(self, step: int) -> bool:
        return step % self.config.sync_every == 0

    def meet(self, engine: Engine) -> None:
        """Average the replicas' changes since the last meeting into a new anchor, which every replica adopts."""
        engine.update_weights(self._meet_on_shard, outer_shard)

    def _meet_on_shard(self, name: str, weights: dict[str, Tensor], outer: dict[str, Tensor]) -> None:
        exchange, owner = self.sync.exchange, self.sync.owner(name)
        anchor = {k: outer[f"{k}.anchor"] for k in weights}
        deltas = [(anchor[k] - weights[k].float()).contiguous() for k in weights]
        averaged = exchange.reduce_to_owner(owner, deltas).wait()
        if averaged is not None:
            momentum = {k: outer[f"{k}.momentum"] for k in weights}
            new = outer_update(anchor, dict(zip(weights, averaged, strict=True)), momentum, self.config,
                               [k for k in weights if is_orthonormal_factor(k)])
            for k in weights:
                weights[k].copy_(new[k].to(weights[k].dtype))
        exchange.broadcast_from_owner(owner, list(weights.values())).wait()
        for k in weights:
            anchor[k].copy_(weights[k].float())
