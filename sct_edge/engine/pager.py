"""The pager: which shards live in RAM, and the reader/writer threads that move the others through it.

Resident shards (the plan's first blocks, the embedding and the head, with their AdamW moments) are read
once, kept as owned tensors and written only before a commit (`flush`). Paged shards are read ahead by the
reader thread into owned tensors (the mapping is released at once, so the file's pages leave the process)
and written back by the writer thread after their update. The engine asks for shards by name in the order
it computes; the pager reports each block's state (loading, resident, computing, writing, disk) through the
engine's event callback, which is what the TUI's layer map shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from sct_edge.engine.clock import PhaseClock
from sct_edge.engine.process import release_free_heap, single_openmp_thread
from sct_edge.events import BlockEvent, EventSink
from sct_edge.store.shard_names import block_index, block_shard, optim_shard, weights_shard

MAX_PENDING_WRITES = 2  # shards (one block's weights and moments) queued for write-back at most


class Pager:
    """Shards in RAM by name: resident ones kept across steps, paged ones read ahead and written back."""

    def __init__(
        self,
        store,
        resident: set[str],
        prefetch_depth: int,
        device: torch.device,
        on_event: EventSink | None = None,
        skips: Callable[[str], bool] | None = None,
        trim_heap: bool = False,
    ) -> None:
        self.store = store
        self.trim_heap = trim_heap  # hand freed malloc memory back to the OS before each load (the plan decides)
        self.resident_names = frozenset(resident)
        self.skips = skips  # shards this process never reads (another replica's moments): never prefetched
        self.prefetch_depth = max(0, prefetch_depth)
        self.device = device
        self.on_event = on_event
        self.kept: dict[str, dict[str, Tensor]] = {}
        self.dirty: set[str] = set()
        self.write_wait_s = 0.0  # compute time spent waiting for the writer's queue to drain
        self.reads: dict[str, Future] = {}
        self.writes: list[Future] = []
        # The I/O threads copy with one thread each. A copy on more would give each of them its own OpenMP
        # team, and once a process runs more OpenMP threads than cores, libgomp stops spinning between
        # parallel regions: every small op of the compute thread then waits for its team to wake (measured:
        # the retraction of 10 sct-70b layers 0.19 s instead of 0.13 s).
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="sct-read", initializer=single_openmp_thread)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="sct-write", initializer=single_openmp_thread)

    def is_resident(self, name: str) -> bool:
        """Whether the shard stays in RAM across steps."""
        return name in self.resident_names

    def emit_state(self, name: str, state: str) -> None:
        """Report a block's state (loading, resident, computing, writing, disk) to the event callback."""
        layer = block_index(name)
        if self.on_event is not None and layer is not None and weights_shard(name) == name:
            self.on_event(BlockEvent(block=layer, state=state))

    def _load(self, name: str) -> dict[str, Tensor]:
        # Paged blocks come and go in every thread's malloc arena; each arena may keep up to the trim
        # threshold of freed memory, which a tight budget cannot spare. Hand it back before each new block.
        if self.trim_heap:
            release_free_heap()
        views = self.store.read(name)
        tensors = {k: v.to(self.device, copy=True) for k, v in views.items()}
        del views
        self.store.release(name)
        return tensors

    def prefetch(self, name: str) -> None:
        """Start reading a shard in the background unless it is in RAM or already on its way."""
        if name in self.kept or name in self.reads or (self.skips is not None and self.skips(name)):
            return
        self.emit_state(name, "loading")
        self.reads[name] = self.reader.submit(self._load, name)

    def prefetch_window(self, order: list[int], position: int, with_state: bool) -> None:
        """Read ahead the `prefetch_depth` blocks after `order[position]` (and their moments if `with_state`)."""
        for j in order[position + 1 : position + 1 + self.prefetch_depth]:
            self.prefetch(block_shard(j))
            if with_state:
                self.prefetch(optim_shard(block_shard(j)))

    def get(self, name: str, clock: PhaseClock | None = None) -> dict[str, Tensor]:
        """A shard's tensors, waiting for the reader if needed (the wait counts as `io_wait` on `clock`)."""
        if name in self.kept:
            return self.kept[name]
        self.prefetch(name)
        since = time.perf_counter()
        tensors = self.reads.pop(name).result()
        if clock is not None:
            clock.add("io_wait", since)
        if name in self.resident_names:
            self.kept[name] = tensors
        self.emit_state(name, "resident")
        return tensors

    def put(self, name: str, tensors: dict[str, Tensor], modified: bool) -> None:
        """Done with a shard for now: keep it (resident) or write it back if modified and let it go."""
        if name in self.resident_names:
            if modified:
                self.dirty.add(name)
            return
        if modified:
            self.emit_state(name, "writing")
            cpu = {k: v.detach().cpu() if v.device.type != "cpu" else v.detach() for k, v in tensors.items()}
            # The plan budgets one block (weights + moments) waiting for the disk; wait rather than queue more.
            since = time.perf_counter()
            while len(self.writes) >= MAX_PENDING_WRITES:
                self.writes.pop(0).result()
            self.write_wait_s += time.perf_counter() - since
            self.writes.append(self.writer.submit(self._write, name, cpu))
        else:
            self.emit_state(name, "disk")

    def _write(self, name: str, tensors: dict[str, Tensor]) -> None:
        self.store.write(name, tensors)
        self.emit_state(name, "disk")

    def drain_writes(self, clock: PhaseClock) -> None:
        """Wait for every queued write-back; the wait, and the step's waits for queue room, count as io_wait."""
        since = time.perf_counter()
        for future in self.writes:
            future.result()
        self.writes.clear()
        clock.add("io_wait", since)
        clock.seconds["io_wait"] += self.write_wait_s
        self.write_wait_s = 0.0

    def flush(self) -> None:
        """Write every modified resident shard (before a commit)."""
        for name in sorted(self.dirty):
            self.store.write(name, {k: v.detach().cpu() for k, v in self.kept[name].items()})
        self.dirty.clear()

    def close(self) -> None:
        """Finish pending reads and writes and stop the I/O threads."""
        for future in list(self.reads.values()) + self.writes:
            future.result()
        self.reads.clear()
        self.writes.clear()
        self.reader.shutdown()
        self.writer.shutdown()
