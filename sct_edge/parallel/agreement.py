"""Replicas agree before they train: the same model, the same committed step, the same weights.

Each rank trains its own replica of the store. At start the ranks exchange (step, weights digest, model)
and refuse to train unless all agree, naming the rank and store that differ: a replica restored from an
old backup or trained alone must not be averaged into the others. The digest covers every weight shard's
data crc32 (read from the shard headers, no tensor data) and the model config; optimizer moments are not
compared, since each rank keeps only those of the blocks it owns.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import torch.distributed as dist

from sct_edge.errors import SctError
from sct_edge.parallel.world import World
from sct_edge.store.store import Store


@dataclass(frozen=True)
class ReplicaState:
    rank: int
    store: str
    step: int
    digest: str
    model: str

    def describe(self) -> str:
        return f"rank {self.rank} ({self.store}) is at step {self.step} with weights {self.digest} of {self.model}"


def weights_digest(store: Store) -> str:
    """A short digest of the model config and every weight shard's committed data."""
    crc = zlib.crc32(json.dumps(store.config.to_dict(), sort_keys=True).encode())
    for name in sorted(store.weight_shard_names()):
        crc = zlib.crc32(f"{name}:{store.data_crc32(name):08x};".encode(), crc)
    return f"{crc:08x}"


def replica_state(world: World, store: Store) -> ReplicaState:
    return ReplicaState(world.rank, str(store.path), store.step, weights_digest(store), store.config.name)


def check_replicas_agree(world: World, store: Store) -> None:
    """Raise a one-line SctError unless every rank's store holds the same model, step and weights."""
    mine = replica_state(world, store)
    states: list[ReplicaState | None] = [None] * world.size
    dist.all_gather_object(states, mine)
    reference = states[0]
    for state in states[1:]:
        if (state.model, state.step, state.digest) != (reference.model, reference.step, reference.digest):
            raise SctError(f"replicas differ: {state.describe()}, but {reference.describe()}; "
                           f"give every rank a copy of the same store")
