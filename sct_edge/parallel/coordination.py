"""What the trainer does differently as one of several replicas: its slice of the batch, the decisions every
rank must take together, and commits that all ranks make at the same step or none does.

- Batches: N ranks with `--batch B` draw the global batch of N·B sequences one process with `--batch N·B`
  would draw (every rank runs the same sampler), and rank k trains on rows k·B … (k+1)·B − 1 of it.
- Decisions: stopping, committing, evaluating, sampling and pausing are taken by any rank (a key in rank 0's
  TUI, a signal, a battery, a time limit) and apply to all: before each step the ranks combine their wishes
  (a max over one small tensor), so collectives never wait on a rank that chose differently.
- Commits: two phases. Every rank prepares step s (its shards written and a prepared manifest fsynced),
  the ranks meet, then every rank makes the prepared manifest current. A rank killed before the meeting
  leaves the others prepared but not committed (they stop with an error, keeping what they prepared); one
  killed after it leaves a prepared step that the others committed. At restart `resolve_prepared` settles
  which: the prepared step is committed where every rank holds it (prepared or committed), and dropped
  everywhere otherwise, so all ranks resume at one step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sct_edge.errors import SctError
from sct_edge.parallel.agreement import check_replicas_agree
from sct_edge.parallel.replicas import ReplicaSync
from sct_edge.parallel.world import World, collective_failure
from sct_edge.store.store import Store


@dataclass(frozen=True)
class Decisions:
    """What every rank must do alike before the next step: true on any rank means true on all."""

    stop: bool = False
    commit: bool = False
    evaluate: bool = False
    sample: bool = False
    pause: bool = False
    out_of_time: bool = False


class Replication:
    """The trainer's view of the other replicas (`None` of it in a single-process run)."""

    def __init__(self, world: World, n_layers: int, grad_dtype: torch.dtype) -> None:
        self.world = world
        self.sync = ReplicaSync(world, n_layers, grad_dtype)

    def my_rows(self, micro_batch: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
        """This rank's rows of a micro-batch of the global batch."""
        x, y = micro_batch
        rows = x.shape[0] // self.world.size
        if rows * self.world.size != x.shape[0]:
            raise ValueError(f"a global batch of {x.shape[0]} rows does not split over {self.world.size} ranks")
        part = slice(self.world.rank * rows, (self.world.rank + 1) * rows)
        return x[part], None if y is None else y[part]

    def agree(self, wishes: Decisions) -> Decisions:
        """The decisions of all ranks combined (a logical or), the same on every rank."""
        names = [f.name for f in dataclasses.fields(Decisions)]
        flags = torch.tensor([int(getattr(wishes, n)) for n in names], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return Decisions(**{n: bool(v) for n, v in zip(names, flags.tolist(), strict=True)})

    def check(self, store: Store) -> None:
        check_replicas_agree(self.world, store)

    def resolve_prepared(self, store: Store) -> None:
        """Settle a commit that a crash interrupted between its two phases (see the module docstring)."""
        prepared = store.prepared_step()
        steps: list[int | None] = [None] * self.world.size
        dist.all_gather_object(steps, store.step if prepared is None else prepared)
        if prepared is None:
            return
        if all(s == prepared for s in steps):
            store.finish_prepared()
        else:
            store.abort_prepared()

    def commit(self, store: Store, step: int, state: dict) -> None:
        """Commit `step` on every rank or on none.

        A rank that loses a peer between the phases keeps its prepared step and stops: whether that step
        counts is settled at the next start, when every rank's state is known (`resolve_prepared`).
        """
        store.prepare_commit(step, state)
        try:
            dist.barrier()
        except RuntimeError as error:
            raise SctError(f"rank {self.world.rank}: a replica was lost while committing step {step} "
                           f"({collective_failure(error)}); store {store.path} stays at step {store.step}") from None
        store.finish_prepared()
