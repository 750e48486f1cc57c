"""The paging scheduler: one training step streamed block by block through RAM under a memory plan.

Forward runs block by block under `no_grad`, keeping only each block's input (the boundary activation).
The loss is taken at the head; backward walks the blocks in reverse: block i is paged in, its forward is
recomputed from the saved input with grad, the incoming gradient is backpropagated, and as soon as block
i's gradients are complete AdamW is applied, U and V are retracted, and the block is written back and
released. At most one block's gradients exist at a time and no dense in × out matrix is built.

Micro-batches run in layer-major order (every micro-batch passes block i before block i+1 is touched), so a
block is read once for forward and once for backward per optimizer step, whatever the accumulation.

Residency follows the plan: the first `resident_blocks` blocks, the embedding and the head stay in RAM
across steps (no I/O at all when everything fits); the others are read by a background reader thread
`prefetch_depth` blocks ahead of compute and written back by a background writer thread, overlapping I/O
with compute.

With `activations = "keep"` (or `auto` when the plan finds room), resident blocks keep their forward graph
instead (no recompute, more memory); paged blocks always recompute, since their weights leave RAM between
the two passes. With `activations = "spill"` the boundary activations go to disk in forward and come back
in backward (`sct_edge/spill.py`): only the block being computed has its input in RAM.

Global-norm gradient clipping needs every gradient before any update. With `max_grad_norm` set, the step
runs a first backward pass that only measures the gradient norm (recomputing, nothing updated or written),
then the real backward pass with the gradients scaled; it costs one extra backward, and exactness is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from sct_edge.engine.adamw import OptimConfig, adamw_update, is_orthonormal_factor
from sct_edge.engine.process import release_free_heap, single_openmp_thread, tune_malloc
from sct_edge.engine.spill import ActivationSpill
from sct_edge.model.config import ModelConfig
from sct_edge.model.retraction import retract_
from sct_edge.model.transformer import Block, build_embedding, build_head, rope_tables, tied_head_logits
from sct_edge.store.store import block_shard, optim_shard

EventSink = Callable[[dict], None]
MAX_PENDING_WRITES = 2  # shards (one block's weights and moments) queued for write-back at most


def strip_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class StepResult:
    loss: float
    phase_s: dict[str, float]
    bytes_read: int
    bytes_written: int
    ortho_err: float
    grad_norm: float | None
    tokens: int


@dataclass
class BackwardResult:
    loss: float
    ortho_err: float
    squared_norm: float


@dataclass
class PhaseClock:
    """Wall time per phase of a step; `io_wait` is time compute spent blocked on the disk."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now


class Residency:
    """Which shards live in RAM, and the reader/writer threads that page the others.

    Resident shards are read once, kept as owned tensors and written only at commit. Paged shards are
    read ahead by the reader thread into owned tensors (the mapping is released at once, so the file's
    pages leave the process) and written back by the writer thread after their update.
    """

    def __init__(self, store, resident: set[str], device: torch.device, on_event: EventSink | None = None):
        self.store = store
        self.resident_names = resident
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

    def _load(self, name: str) -> dict[str, Tensor]:
        # Paged blocks come and go in every thread's malloc arena; each arena may keep up to the trim
        # threshold of freed memory, which a tight budget cannot spare. Hand it back before each new block.
        release_free_heap()
        views = self.store.read(name)
        tensors = {k: v.to(self.device, copy=True) for k, v in views.items()}
        del views
        self.store.release(name)
        return tensors

    def _emit(self, name: str, state: str) -> None:
        if self.on_event is not None and name.startswith("block.") and not name.endswith(".optim"):
            self.on_event({"event": "block", "block": int(name[6:]), "state": state})

    def prefetch(self, name: str) -> None:
        if name in self.kept or name in self.reads:
            return
        self._emit(name, "loading")
        self.reads[name] = self.reader.submit(self._load, name)

    def get(self, name: str, clock: PhaseClock) -> dict[str, Tensor]:
        if name in self.kept:
            return self.kept[name]
        self.prefetch(name)
        since = time.perf_counter()
        tensors = self.reads.pop(name).result()
        clock.add("io_wait", since)
        if name in self.resident_names:
            self.kept[name] = tensors
        self._emit(name, "resident")
        return tensors

    def put(self, name: str, tensors: dict[str, Tensor], modified: bool) -> None:
        """Done with a shard for now: keep it (resident) or write it back if modified and let it go."""
        if name in self.resident_names:
            if modified:
                self.dirty.add(name)
            return
        if modified:
            self._emit(name, "writing")
            cpu = {k: v.detach().cpu() if v.device.type != "cpu" else v.detach() for k, v in tensors.items()}
            # The plan budgets one block (weights + moments) waiting for the disk; wait rather than queue more.
            since = time.perf_counter()
            while len(self.writes) >= MAX_PENDING_WRITES:
                self.writes.pop(0).result()
            self.write_wait_s += time.perf_counter() - since
            self.writes.append(self.writer.submit(self._write, name, cpu))
        else:
            self._emit(name, "disk")

    def _write(self, name: str, tensors: dict[str, Tensor]) -> None:
        self.store.write(name, tensors)
        self._emit(name, "disk")

    def drain_writes(self, clock: PhaseClock) -> None:
        since = time.perf_counter()
        for future in self.writes:
            future.result()
        self.writes.clear()
        clock.add("io_wait", since)

    def flush(self) -> None:
        """Write every modified resident shard (before a commit)."""
        for name in sorted(self.dirty):
            self.store.write(name, {k: v.detach().cpu() for k, v in self.kept[name].items()})
        self.dirty.clear()

    def close(self) -> None:
        for future in list(self.reads.values()) + self.writes:
            future.result()
        self.reads.clear()
        self.writes.clear()
        self.reader.shutdown()
        self.writer.shutdown()


class StreamingStep:
    """Runs training steps (and inference forwards) over a store, paging blocks per the plan."""

    def __init__(
        self,
        store,
        resident_blocks: int,
        prefetch_depth: int,
        optim: OptimConfig,
        device: torch.device | str = "cpu",
        workload: str = "lm",
        on_event: EventSink | None = None,
        activations: str = "recompute",
    ) -> None:
        tune_malloc()
        self.store = store
        self.activations = activations
        self.config: ModelConfig = store.config
        self.optim = optim
        self.device = torch.device(device)
        self.workload = workload
        self.prefetch_depth = max(0, prefetch_depth)
        self.n_layers = self.config.n_layers
        self.templates = [Block(self.config, i, device="meta") for i in range(self.n_layers)]
        self.embed_template = build_embedding(self.config, device="meta")
        head = build_head(self.config, device="meta")
        self.head_template = head
        resident = {block_shard(i) for i in range(min(resident_blocks, self.n_layers))}
        resident |= {optim_shard(n) for n in resident}
        if workload == "lm":
            resident |= {"embed", "embed.optim", "head", "head.optim"}
        self.resident_blocks = min(resident_blocks, self.n_layers)
        self.residency = Residency(store, resident, self.device, on_event)
        self.spill = ActivationSpill(store.path) if activations == "spill" else None

    def close(self) -> None:
        """Finish pending writes, stop the I/O threads and remove spilled activations."""
        self.residency.close()
        if self.spill is not None:
            self.spill.close()

    # ---------------------------------------------------------------- forward pieces

    def _embed(self, weights: dict[str, Tensor], tokens: Tensor) -> Tensor:
        return functional_call(self.embed_template, strip_prefix(weights, "embed."), (tokens,))

    def _logits(self, head: dict[str, Tensor], embed: dict[str, Tensor] | None, h: Tensor) -> Tensor:
        h = F.rms_norm(h, (h.shape[-1],), head["norm.weight"], self.config.norm_eps)
        if self.head_template is None:
            return tied_head_logits(strip_prefix(embed, "embed."), h)
        return functional_call(self.head_template, strip_prefix(head, "head."), (h,))

    def _block(self, i: int, weights: dict[str, Tensor], x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        return functional_call(self.templates[i], weights, (x, *rope))

    def _block_cached(self, i: int, weights: dict[str, Tensor], x: Tensor, rope, cache) -> Tensor:
        return functional_call(self.templates[i], weights, (x, *rope, cache))

    def _prefetch_window(self, order: list[int], position: int, with_state: bool) -> None:
        for j in order[position + 1 : position + 1 + self.prefetch_depth]:
            self.residency.prefetch(block_shard(j))
            if with_state:
                self.residency.prefetch(optim_shard(block_shard(j)))

    # ---------------------------------------------------------------- the step

    def step(
        self, micro_batches: list[tuple[Tensor, Tensor | None]], step: int, lr_scale: float = 1.0
    ) -> StepResult:
        """One optimizer step over `micro_batches` ((tokens, targets) for "lm", (hidden, None) for "seed").

        `step` is the optimizer step number being taken (1 for the first). The store is not committed here.
        """
        clock = PhaseClock()
        read0, written0 = self._bytes_moved()
        started = time.perf_counter()
        boundaries = self._forward(micro_batches, clock)
        grad_norm = None
        grad_scale = 1.0
        if self.optim.max_grad_norm is not None:
            measured = self._backward(micro_batches, boundaries, step, lr_scale, clock, update=False)
            grad_norm = measured.squared_norm**0.5
            grad_scale = min(1.0, self.optim.max_grad_norm / (grad_norm + 1e-6))
        result = self._backward(micro_batches, boundaries, step, lr_scale, clock, update=True, grad_scale=grad_scale)
        self.residency.drain_writes(clock)
        clock.seconds["io_wait"] = clock.seconds.get("io_wait", 0.0) + self.residency.write_wait_s
        self.residency.write_wait_s = 0.0
        accounted = sum(clock.seconds.values())
        clock.seconds["other"] = max(0.0, time.perf_counter() - started - accounted)
        tokens = sum(x.numel() for x, _ in micro_batches) if self.workload == "lm" else 0
        read1, written1 = self._bytes_moved()
        return StepResult(
            loss=result.loss, phase_s=clock.seconds, bytes_read=read1 - read0, bytes_written=written1 - written0,
            ortho_err=result.ortho_err, grad_norm=grad_norm, tokens=tokens,
        )

    def _bytes_moved(self) -> tuple[int, int]:
        """Bytes read and written so far: the store's shards plus spilled activations."""
        spill_read, spill_written = (self.spill.bytes_read, self.spill.bytes_written) if self.spill else (0, 0)
        return self.store.bytes_read + spill_read, self.store.bytes_written + spill_written

    def _rope(self, seq: int) -> tuple[Tensor, Tensor]:
        cos, sin = rope_tables(self.config, torch.arange(seq))
        return cos.to(self.device), sin.to(self.device)

    def keeps_graph(self, name: str) -> bool:
        """With activations = "keep", a resident block keeps its forward graph: backward needs no recompute."""
        return self.activations == "keep" and name in self.residency.resident_names

    def _forward(self, micro_batches, clock: PhaseClock, turnaround: bool = True) -> list[list[Tensor]]:
        """Boundary activations: index i holds block i's input per micro-batch (index L: the last output)."""
        self._graphs: dict[int, tuple] = {}
        since = time.perf_counter()
        with torch.no_grad():
            if self.workload == "lm":
                embed = self.residency.get("embed", clock)
                since = time.perf_counter()
                hidden = [self._embed(embed, x.to(self.device)) for x, _ in micro_batches]
            else:
                hidden = [x.to(self.device) for x, _ in micro_batches]
            rope = self._rope(hidden[0].shape[1])
            boundaries = [hidden]
            order = list(range(self.n_layers))
            for pos, i in enumerate(order):
                self._prefetch_window(order, pos, with_state=False)
                name = block_shard(i)
                since = clock.add("forward", since)
                weights = self.residency.get(name, clock)
                since = time.perf_counter()
                self.residency._emit(name, "computing")
                if turnaround and self.keeps_graph(name):
                    with torch.enable_grad():
                        params = {k: v.detach().requires_grad_() for k, v in weights.items()}
                        inputs = [h.detach().requires_grad_() for h in hidden]
                        outputs = [self._block(i, params, h, rope) for h in inputs]
                    self._graphs[i] = (params, inputs, outputs)
                    hidden = [o.detach() for o in outputs]
                else:
                    hidden = [self._block(i, weights, h, rope) for h in hidden]
                boundaries.append(hidden)
                since = clock.add("forward", since)
                if self.spill is not None:
                    # Only a training step's backward needs block i's input again; evaluation drops it.
                    if turnaround:
                        self.spill.put(i, boundaries[i])
                    boundaries[i] = None
                    since = clock.add("spill", since)
                self.residency.put(name, weights, modified=False)
                del weights
                if turnaround and pos == len(order) - 1:
                    # Turn around: the backward pass starts from the last blocks.
                    back = order[::-1]
                    for j in back[: self.prefetch_depth + 1]:
                        self.residency.prefetch(block_shard(j))
                        self.residency.prefetch(optim_shard(block_shard(j)))
        clock.add("forward", since)
        return boundaries

    def evaluate(self, micro_batches: list[tuple[Tensor, Tensor]]) -> float:
        """Mean cross-entropy over the micro-batches, forward only (blocks paged as in training)."""
        clock = PhaseClock()
        top = self._forward(micro_batches, clock, turnaround=False)[-1]
        head = self.residency.get("head", clock)
        embed = self.residency.get("embed", clock)
        with torch.no_grad():
            losses = [F.cross_entropy(self._logits(head, embed, h).flatten(0, 1).float(), y.to(self.device).flatten())
                      for (_, y), h in zip(micro_batches, top, strict=True)]
        return float(torch.stack(losses).mean())

    def _head_backward(self, micro_batches, top: list[Tensor], clock: PhaseClock, step, lr_scale, update,
                       grad_scale) -> tuple[list[Tensor], float, float]:
        """Loss at the head; returns d loss / d top hidden state per micro-batch, the loss, and grad² sum."""
        n = len(micro_batches)
        if self.workload == "seed":
            # The seeds' step: loss = sum of the final hidden states.
            loss = sum(float(h.sum()) for h in top)
            return [torch.ones_like(h) for h in top], loss, 0.0
        head = self.residency.get("head", clock)
        embed = self.residency.get("embed", clock) if self.head_template is None else None
        since = time.perf_counter()
        params = {k: v.detach().requires_grad_() for k, v in head.items()}
        tied = None if embed is None else {k: v.detach().requires_grad_() for k, v in embed.items()}
        grads_out, total = [], 0.0
        for (_, y), h in zip(micro_batches, top, strict=True):
            h = h.detach().requires_grad_()
            logits = self._logits(params, tied, h)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(self.device).flatten()) / n
            loss.backward()
            total += loss.item()
            grads_out.append(h.grad)
        clock.add("backward", since)
        squared = sum(float(p.grad.pow(2).sum()) for p in params.values())
        self._finish_shard("head", head, params, step, lr_scale, update, grad_scale, clock)
        if tied is not None:
            # Tied head: the embedding's gradient continues to accumulate through the lookup later.
            self._tied_grads = {k: v.grad for k, v in tied.items()}
        return grads_out, total, squared

    def _finish_shard(self, name, tensors, params, step, lr_scale, update, grad_scale, clock) -> float:
        """AdamW + retraction on one shard's parameters once their gradients are complete; then put it back."""
        ortho = 0.0
        if update:
            state = self.residency.get(optim_shard(name), clock)
            since = time.perf_counter()
            weights = {k: tensors[k] for k in params}
            grads = {k: p.grad for k, p in params.items()}
            with torch.no_grad():
                adamw_update(weights, grads, {k: state[f"{k}.exp_avg"] for k in params},
                             {k: state[f"{k}.exp_avg_sq"] for k in params}, step, self.optim, lr_scale, grad_scale)
            since = clock.add("optimizer", since)
            factors = [weights[k] for k in weights if is_orthonormal_factor(k)]
            if factors:
                with torch.no_grad():
                    ortho = retract_(factors).max_error
            clock.add("retraction", since)
            self.residency.put(optim_shard(name), state, modified=True)
        self.residency.put(name, tensors, modified=update)
        return ortho

    def _backward(
        self, micro_batches, boundaries, step, lr_scale, clock, update: bool, grad_scale: float = 1.0
    ) -> BackwardResult:
        """Reverse pass. With update=False nothing changes: it only measures the squared global gradient norm."""
        self._tied_grads = None
        grads, loss, squared = self._head_backward(micro_batches, boundaries[-1], clock, step, lr_scale, update,
                                                   grad_scale)
        ortho = 0.0
        rope = self._rope(boundaries[-1][0].shape[1])
        order = list(range(self.n_layers))[::-1]
        for pos, i in enumerate(order):
            name = block_shard(i)
            self._prefetch_window(order, pos, with_state=update)
            tensors = self.residency.get(name, clock)
            since = time.perf_counter()
            self.residency._emit(name, "computing")
            if i in self._graphs:
                params, inputs, outputs = self._graphs[i] if not update else self._graphs.pop(i)
                for p in list(params.values()) + inputs:
                    p.grad = None
                for out, g in zip(outputs, grads, strict=True):
                    out.backward(g, retain_graph=not update)
                grads = [h.grad for h in inputs]
            else:
                if boundaries[i] is None:
                    inputs = self.spill.get(i)
                    since = clock.add("spill", since)
                else:
                    inputs = boundaries[i]
                params = {k: v.detach().requires_grad_() for k, v in tensors.items()}
                new_grads = []
                for h, g in zip(inputs, grads, strict=True):
                    h = h.detach().requires_grad_()
                    self._block(i, params, h, rope).backward(g)
                    new_grads.append(h.grad)
                grads = new_grads
            since = clock.add("backward", since)
            if update:
                ortho = max(ortho, self._finish_shard(name, tensors, params, step, lr_scale, True, grad_scale, clock))
            else:
                squared += sum(float(p.grad.pow(2).sum()) for p in params.values())
                self.residency.put(name, tensors, modified=False)
            del params, tensors
        if self.workload == "lm":
            embed = self.residency.get("embed", clock)
            since = time.perf_counter()
            params = {k: v.detach().requires_grad_() for k, v in embed.items()}
            for (x, _), g in zip(micro_batches, grads, strict=True):
                self._embed(params, x.to(self.device)).backward(g)
            if self._tied_grads is not None:
                for k, g in self._tied_grads.items():
                    params[k].grad += g
            clock.add("backward", since)
            if update:
                ortho = max(ortho, self._finish_shard("embed", embed, params, step, lr_scale, True, grad_scale, clock))
            else:
                squared += sum(float(p.grad.pow(2).sum()) for p in params.values())
                self.residency.put("embed", embed, modified=False)
        return BackwardResult(loss=loss, ortho_err=ortho, squared_norm=squared)
