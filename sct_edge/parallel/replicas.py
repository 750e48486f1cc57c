"""The engine's side of data parallelism: each shard's gradients, once complete, go to its owner.

The engine hands every shard whose backward is done to `ReplicaSync.submit`: its gradient bucket starts on
its way to the shard's owner at once, and the shard is finished one shard later, while the engine computes
the backward of the next block, so the exchange hides behind compute (as DDP's buckets do). Finishing a
shard means: on the owner, the averaged gradients replace the local ones and the update (AdamW and the
retraction) runs; then the owner broadcasts the new weights, and the other ranks copy them in before the
shard is written back. In a measuring pass (global-norm clipping) the owner only adds up the averaged
gradients' squared norm.

Every rank submits the same shards in the same order, which is what collectives need.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sct_edge.parallel.exchange import CommStats, GradientExchange, PendingBroadcast, PendingReduce
from sct_edge.parallel.world import World
from sct_edge.store.store import block_shard

IN_FLIGHT = 1  # shards whose exchange may still run while the next block's backward is computed


@dataclass
class ShardInFlight:
    name: str
    owner: int
    tensors: dict[str, Tensor]
    params: dict[str, Tensor]
    update: Callable[[], float] | None  # the owner's AdamW + retraction (None: a measuring pass)
    put: Callable[[bool], None]  # hand the shard back to the pager (modified or not)
    reduce: PendingReduce | None = None
    broadcast: PendingBroadcast | None = field(default=None, repr=False)


class ReplicaSync:
    """Reduce-to-owner and broadcast-back of every shard of a step, pipelined one shard deep."""

    def __init__(self, world: World, n_layers: int, grad_dtype: torch.dtype = torch.float32) -> None:
        self.world = world
        self.n_layers = n_layers
        # The head and the embedding are owned as if they were blocks n and n + 1.
        self.index = {block_shard(i): i for i in range(n_layers)} | {"head": n_layers, "embed": n_layers + 1}
        self.exchange = GradientExchange(world, grad_dtype)
        self.reducing: deque[ShardInFlight] = deque()
        self.broadcasting: deque[ShardInFlight] = deque()
        self.ortho = 0.0
        self.squared = 0.0

    def owner(self, name: str) -> int:
        """Block i belongs to rank i mod N; the head and the embedding follow the last block."""
        return self.world.owner(self.index[name])

    def owns(self, name: str) -> bool:
        return self.owner(name) == self.world.rank

    def submit(self, name: str, tensors: dict[str, Tensor], params: dict[str, Tensor],
               update: Callable[[], float] | None, put: Callable[[bool], None]) -> None:
        """A shard's local gradients (`params[k].grad`) are complete: start their exchange."""
        item = ShardInFlight(name, self.owner(name), tensors, params, update, put)
        item.reduce = self.exchange.reduce_to_owner(item.owner, [p.grad for p in params.values()])
        if update is None:
            put(False)  # measuring: the gradients travel in their bucket and the weights do not change
        self.reducing.append(item)
        self._advance(IN_FLIGHT)

    def drain(self) -> tuple[float, float]:
        """Finish every shard in flight; returns (worst orthonormality error, squared norm) since the last drain."""
        self._advance(0)
        ortho, squared = self.ortho, self.squared
        self.ortho, self.squared = 0.0, 0.0
        return ortho, squared

    def mean(self, value: float) -> float:
        return self.exchange.sum_scalars([value])[0] / self.world.size

    def total(self, value: float) -> float:
        return self.exchange.sum_scalars([value])[0]

    def take_stats(self) -> CommStats:
        return self.exchange.stats.take()

    def _advance(self, keep: int) -> None:
        while len(self.reducing) > keep:
            self._finish_reduce(self.reducing.popleft())
        while len(self.broadcasting) > keep:
            self._finish_broadcast(self.broadcasting.popleft())

    def _finish_reduce(self, item: ShardInFlight) -> None:
        grads = item.reduce.wait()
        mine = item.owner == self.world.rank
        if item.update is None:
            if mine:
                self.squared += sum(float(g.float().pow(2).sum()) for g in grads)
            return
        if mine:
            for p, g in zip(item.params.values(), grads, strict=True):
                p.grad = g
            self.ortho = max(self.ortho, item.update())
        weights = [item.tensors[k] for k in item.params]
        item.broadcast = self.exchange.broadcast_from_owner(item.owner, weights)
        self.broadcasting.append(item)

    def _finish_broadcast(self, item: ShardInFlight) -> None:
        item.broadcast.wait()
        if item.owner != self.world.rank:
            item.put(True)
