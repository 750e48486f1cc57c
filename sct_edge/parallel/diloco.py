"""DiLoCo (Douillard et al., arXiv 2311.08105): replicas train alone for H steps, then meet once.

Over a slow link (Wi-Fi, the internet) exchanging every block's gradients every step costs more than the
step. With `--sync-every H` each replica takes H ordinary local steps (its own AdamW moments, its own data
slice); then the replicas average their change since the last meeting, Δ = anchor − local, and an outer
Nesterov-momentum SGD step moves the anchor (the weights all replicas last agreed on):

    m ← μ·m + Δ̄;   anchor ← anchor − η·(Δ̄ + μ·m)

after which U and V are retracted onto the Stiefel manifold, and every replica continues from the new
anchor. Communication falls by a factor H. As in the per-step exchange, each shard's outer step is taken by
its owner, which broadcasts the result, so the replicas stay bit-identical. The outer momentum lives in the
store (shards `NAME.outer`) and is committed with it; the anchor is the committed weights themselves, since
a DiLoCo run commits only right after a meeting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sct_edge.model.retraction import retract_


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
