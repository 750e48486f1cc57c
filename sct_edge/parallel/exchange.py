"""One block's gradient exchange: reduced onto the block's owner, updated weights broadcast back.

Data parallelism on SCT moves only the factors' gradients (a spectral block has (in + out)·k of them per
matrix, not in·out). For block i every rank's gradients are summed onto the block's owner
(`World.owner(i)`) while the backward of block i − 1 runs (gloo and NCCL run asynchronous collectives on
threads of their own); the owner then applies AdamW and the retraction, and broadcasts the new weights.
Replicas therefore stay bit-identical by construction, even across CPUs whose arithmetic differs in the last
bit: only the owner computes an update, everyone else copies it.

A block's tensors travel as one flat bucket (one collective per block and direction, as DDP buckets), in
float32 or, with `grad_dtype = bfloat16`, at half the bytes for the gradients; weights always travel in
their own dtype, so the replicas stay exact. `CommStats` counts the payload bytes this rank hands to the
collectives and the seconds compute spent waiting for them (the part of the exchange not hidden).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sct_edge.parallel.world import World


@dataclass
class CommStats:
    """Payload bytes handed to collectives and seconds spent waiting for them, since the last `take`."""

    bytes_sent: int = 0
    wait_s: float = 0.0

    def take(self) -> CommStats:
        taken = CommStats(self.bytes_sent, self.wait_s)
        self.bytes_sent, self.wait_s = 0, 0.0
        return taken


def _flatten(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _unflatten_into(flat: Tensor, targets: list[Tensor]) -> None:
    offset = 0
    for target in targets:
        n = target.numel()
        target.copy_(flat[offset:offset + n].view(target.shape))
        offset += n


class PendingReduce:
    """A gradient bucket on its way to the owner; `wait` returns the averaged gradients there, else None."""

    def __init__(self, exchange: GradientExchange, owner: int, grads: list[Tensor], bucket: Tensor, work) -> None:
        self.exchange, self.owner, self.grads, self.bucket, self.work = exchange, owner, grads, bucket, work

    def wait(self) -> list[Tensor] | None:
        since = time.perf_counter()
        self.work.wait()
        self.exchange.stats.wait_s += time.perf_counter() - since
        if self.exchange.world.rank != self.owner:
            return None
        averaged = [torch.empty_like(g) for g in self.grads]
        _unflatten_into(self.bucket.to(torch.float32) / self.exchange.world.size, averaged)  # copy_ casts back
        return averaged


class PendingBroadcast:
    """The owner's updated tensors on their way to the other ranks; `wait` copies them into place."""

    def __init__(self, exchange: GradientExchange, owner: int, targets: list[Tensor], bucket: Tensor, work) -> None:
        self.exchange, self.owner, self.targets, self.bucket, self.work = exchange, owner, targets, bucket, work

    def wait(self) -> None:
        since = time.perf_counter()
        self.work.wait()
        self.exchange.stats.wait_s += time.perf_counter() - since
        if self.exchange.world.rank != self.owner:
            with torch.no_grad():
                _unflatten_into(self.bucket, self.targets)


class GradientExchange:
    """Asynchronous reduce-to-owner of gradients and broadcast-from-owner of weights, one bucket a block."""

    def __init__(self, world: World, grad_dtype: torch.dtype = torch.float32) -> None:
        self.world = world
        self.grad_dtype = grad_dtype
        self.stats = CommStats()

    def reduce_to_owner(self, owner: int, grads: list[Tensor]) -> PendingReduce:
        bucket = _flatten(grads, self.grad_dtype)
        work = dist.reduce(bucket, dst=owner, op=dist.ReduceOp.SUM, async_op=True)
        self.stats.bytes_sent += bucket.numel() * bucket.element_size()
        return PendingReduce(self, owner, grads, bucket, work)

    def broadcast_from_owner(self, owner: int, tensors: list[Tensor]) -> PendingBroadcast:
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise ValueError("a broadcast bucket holds tensors of one dtype")
        if self.world.rank == owner:
            bucket = _flatten(tensors, dtype)
            self.stats.bytes_sent += bucket.numel() * bucket.element_size()
        else:
            bucket = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device)
        work = dist.broadcast(bucket, src=owner, async_op=True)
        return PendingBroadcast(self, owner, tensors, bucket, work)

    def sum_scalars(self, values: list[float]) -> list[float]:
        """The sum over ranks of a few numbers (loss, squared gradient norm, token counts), in float64."""
        tensor = torch.tensor(values, dtype=torch.float64)
        since = time.perf_counter()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        self.stats.wait_s += time.perf_counter() - since
        self.stats.bytes_sent += tensor.numel() * tensor.element_size()
        return tensor.tolist()
