"""The streamed engine: training steps, evaluation and the cached forward of generation, over a store, with
blocks paged through RAM as a memory plan says.

`Engine(store, plan, optim)` is the one way in: the trainer, `sct-edge eval`, `sct-edge generate` and
`sct-edge bench step` all call its public methods (`train_step`, `evaluate`, `forward` with `new_cache`,
`flush`, `close`) and nothing else.

A training step: forward runs block by block under `no_grad`, keeping only each block's input (the boundary
activation). The loss is taken at the head; backward walks the blocks in reverse: block i is paged in, its
forward is recomputed from the saved input with grad, the incoming gradient is backpropagated, and as soon
as block i's gradients are complete AdamW is applied, U and V are retracted, and the block is written back
and released (`_finish_shard`). At most one block's gradients exist at a time and no dense in × out matrix
is built.

Micro-batches run in layer-major order (every micro-batch passes block i before block i+1 is touched), so a
block is read once for forward and once for backward per optimizer step, whatever the accumulation.

Residency follows the plan: the first `resident_blocks` blocks, the embedding and the head stay in RAM
across steps (no I/O at all when everything fits); the others are read by the pager's reader thread
`prefetch_depth` blocks ahead of compute and written back by its writer thread, overlapping I/O with
compute (`sct_edge/engine/pager.py`).

With `activations = "keep"` (or `auto` when the plan finds room), resident blocks keep their forward graph
instead (no recompute, more memory); paged blocks always recompute, since their weights leave RAM between
the two passes. With `auto` and room for only some graphs, the last blocks keep theirs
(`MemoryPlan.kept_layers`), and the others leave a memo in forward that spares their recompute the attention
kernel and the MLP's FFN slices (`MemoryPlan.memo_layers`, `sct_edge/model/memo.py`). With
`activations = "spill"` the boundary activations go to disk in forward and come back in backward
(`sct_edge/engine/spill.py`): only the block being computed has its input in RAM.

Global-norm gradient clipping needs every gradient before any update. When the plan holds gradients
(every block resident, room for all their gradients: `MemoryPlan.holds_gradients`), backward runs once and
keeps each shard's gradients; the updates follow, scaled, once the norm is known. Otherwise the step runs a
first backward pass that only measures the gradient norm (recomputing, nothing updated or written), then the
real backward pass with the gradients scaled: one extra backward. Both give the same update.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from sct_edge.engine.adamw import OptimConfig, adamw_update, is_orthonormal_factor
from sct_edge.engine.clock import PhaseClock
from sct_edge.engine.pager import Pager
from sct_edge.engine.plan import MemoryPlan
from sct_edge.engine.profile import compute_autocast
from sct_edge.engine.spill import ActivationSpill
from sct_edge.events import EventSink
from sct_edge.model.accounting import chunk_tokens_for
from sct_edge.model.config import ModelConfig
from sct_edge.model.loss import IGNORE_INDEX, distill_loss_backward, lm_loss_backward
from sct_edge.model.memo import BlockMemo, MemoArena
from sct_edge.model.retraction import retract_
from sct_edge.model.rmsnorm import rms_norm
from sct_edge.model.transformer import Block, KVCache, build_embedding, build_head, rope_tables, tied_head_logits
from sct_edge.store.shard_names import block_shard, is_optim, optim_shard, weights_shard

if TYPE_CHECKING:
    from sct_edge.parallel.replicas import ReplicaSync

# (tokens, targets) for "lm", where the targets are token ids or, to distill from a teacher, its final hidden
# states (floating point, batch x seq x dim); (hidden states, None) for "hidden-sum".
MicroBatch = tuple[Tensor, Tensor | None]


def counted_targets(micro_batches: list[MicroBatch]) -> int:
    """Targets that count in the loss and in tokens/s: all but IGNORE_INDEX (prompt and padding positions), and
    every position of a teacher's hidden states."""
    return sum(y.shape[0] * y.shape[1] if y.is_floating_point() else int((y != IGNORE_INDEX).sum())
               for _, y in micro_batches)


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
    comm_s: float = 0.0  # across replicas: seconds compute waited for the exchange (not hidden behind it)
    comm_bytes: int = 0  # across replicas: payload bytes this rank sent


@dataclass
class KeptGraph:
    """A resident block's forward graph kept for backward (activations = keep): no recompute needed."""

    params: dict[str, Tensor]
    inputs: list[Tensor]
    outputs: list[Tensor]


@dataclass
class ForwardPass:
    """What a step's forward leaves for its backward.

    `boundaries[i]` holds block i's input per micro-batch (index n_layers: the last block's output); it is
    None where the input went to the spill. `graphs` holds the kept forward graphs by block index.
    """

    boundaries: list[list[Tensor] | None]
    graphs: dict[int, KeptGraph] = field(default_factory=dict)
    memos: dict[int, list[BlockMemo]] = field(default_factory=dict)  # by block index, one per micro-batch


@dataclass
class HeldShard:
    """A shard whose gradients are complete and whose update waits for the global gradient norm (clipping)."""

    name: str
    layer: int | None
    tensors: dict[str, Tensor]
    params: dict[str, Tensor]


@dataclass
class BackwardResult:
    loss: float
    ortho_err: float
    squared_norm: float


@dataclass
class GenerationCache:
    """Keys and values of every block for the positions a generation has seen so far."""

    blocks: list[KVCache]
    length: int = 0  # positions already in the cache: the next token's position


class Engine:
    """Training steps, evaluation and cached forwards over a store, blocks paged through RAM per `plan`."""

    def __init__(
        self,
        store,
        plan: MemoryPlan,
        optim: OptimConfig | None = None,
        device: torch.device | str = "cpu",
        on_event: EventSink | None = None,
        replicas: ReplicaSync | None = None,
    ) -> None:
        self.config: ModelConfig = store.config
        if plan.n_layers != self.config.n_layers:
            raise ValueError(f"the plan is for {plan.n_layers} blocks, the store's model has {self.config.n_layers}")
        self.store = store
        self.plan = plan
        self.workload = plan.workload
        self.activations = plan.activations
        self.optim = optim or OptimConfig()
        self.device = torch.device(device)
        # The profile's compute dtype: bfloat16 runs every block's and the head's products under autocast
        # (bfloat16 GEMMs on fp32 weights, which stay the master copy); the loss, AdamW and the retraction
        # stay float32.
        self.compute_dtype = getattr(torch, plan.compute_dtype)
        self.autocast = compute_autocast(self.device.type, plan.compute_dtype)
        self.n_layers = self.config.n_layers
        self.templates = [Block(self.config, i, device="meta") for i in range(self.n_layers)]
        self.embed_template = build_embedding(self.config, device="meta")
        self.head_template = build_head(self.config, device="meta")
        resident = {block_shard(i) for i in range(min(plan.resident_blocks, self.n_layers))}
        resident |= {optim_shard(n) for n in resident}
        if self.workload == "lm":
            resident |= {"embed", "embed.optim", "head", "head.optim"}
        self.replicas = replicas
        if replicas is not None:
            # Across replicas only a shard's owner updates it, so only the owner reads its moments.
            resident = {n for n in resident if not self._not_owned_state(n)}
        self.on_event = on_event
        self.pager = Pager(store, resident, plan.prefetch_depth, self.device, on_event, trim_heap=plan.pages_blocks,
                           skips=None if replicas is None else self._not_owned_state)
        self.spill = ActivationSpill(store.path) if self.activations == "spill" else None
        self.memo_arena = MemoArena(plan.memo_bytes) if plan.memo_blocks else None

    def _not_owned_state(self, name: str) -> bool:
        """Across replicas, the moments of a shard another rank owns: never read here."""
        return is_optim(name) and not self.replicas.owns(weights_shard(name))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Finish pending writes, stop the I/O threads and remove spilled activations."""
        self.pager.close()
        if self.spill is not None:
            self.spill.close()

    def flush(self) -> None:
        """Write the resident shards a step modified to the store (call before `store.commit`)."""
        self.pager.flush()

    def update_weights(self, update: Callable[[str, dict[str, Tensor], dict[str, Tensor]], None],
                       companion: Callable[[str], str]) -> None:
        """Between steps: every weights shard in model order, paged as a step pages it, goes to
        `update(name, weights, state)` with its companion shard `companion(name)` (DiLoCo's outer state, say);
        `update` changes both in place and both are written back (resident ones at the next `flush`)."""
        names = (["embed"] if self.workload == "lm" else []) + [block_shard(i) for i in range(self.n_layers)]
        names += ["head"] if self.workload == "lm" else []
        for pos, name in enumerate(names):
            for ahead in names[pos + 1 : pos + 1 + self.pager.prefetch_depth]:
                self.pager.prefetch(ahead)
                self.pager.prefetch(companion(ahead))
            weights, state = self.pager.get(name), self.pager.get(companion(name))
            update(name, weights, state)
            self.pager.put(companion(name), state, modified=True)
            self.pager.put(name, weights, modified=True)
        self.pager.drain_writes(PhaseClock())

    # ---------------------------------------------------------------- forward pieces

    def _embed(self, weights: dict[str, Tensor], tokens: Tensor) -> Tensor:
        return functional_call(self.embed_template, strip_prefix(weights, "embed."), (tokens,))

    def _logits(self, head: dict[str, Tensor], embed: dict[str, Tensor] | None, h: Tensor) -> Tensor:
        h = rms_norm(h, head["norm.weight"], self.config.norm_eps)
        with self.autocast():
            if self.head_template is None:
                return tied_head_logits(strip_prefix(embed, "embed."), h)
            return functional_call(self.head_template, strip_prefix(head, "head."), (h,))

    def _block(self, i: int, weights: dict[str, Tensor], x: Tensor, rope: tuple[Tensor, Tensor],
               cache: KVCache | None = None, memo: BlockMemo | None = None) -> Tensor:
        with self.autocast():
            return functional_call(self.templates[i], weights, (x, *rope, cache, memo))

    def _rope(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        cos, sin = rope_tables(self.config, torch.arange(start, start + length))
        return cos.to(self.device), sin.to(self.device)

    # ---------------------------------------------------------------- generation

    def new_cache(self) -> GenerationCache:
        """An empty KV cache for `forward`: one per sequence being generated."""
        return GenerationCache([KVCache() for _ in range(self.n_layers)])

    @torch.no_grad()
    def forward(self, tokens: Tensor, cache: GenerationCache | None = None, last_only: bool = False) -> Tensor:
        """Logits (batch × positions × vocab, float32) of token ids (batch × positions), blocks paged as in training.

        With `cache`, the tokens continue the sequence the cache holds (their positions start at
        `cache.length`) and their keys and values are appended to it. `last_only` computes the logits of the
        last position only (generation needs no others).
        """
        if self.workload != "lm":
            raise ValueError("forward needs the language-model workload (the hidden-sum workload has no tokens)")
        start = 0 if cache is None else cache.length
        rope = self._rope(start, tokens.shape[1])
        embed = self.pager.get("embed")
        h = self._embed(embed, tokens.to(self.device))
        order = list(range(self.n_layers))
        for pos, i in enumerate(order):
            self.pager.prefetch_window(order, pos, with_state=False)
            name = block_shard(i)
            weights = self.pager.get(name)
            h = self._block(i, weights, h, rope, None if cache is None else cache.blocks[i])
            self.pager.put(name, weights, modified=False)
        if cache is not None:
            cache.length += tokens.shape[1]
        head = self.pager.get("head")
        return self._logits(head, embed, h[:, -1:] if last_only else h).float()

    # ---------------------------------------------------------------- training and evaluation

    def train_step(self, micro_batches: list[MicroBatch], step: int, lr_scale: float = 1.0) -> StepResult:
        """One optimizer step over `micro_batches` ((tokens, targets) for "lm", (hidden, None) for "hidden-sum").

        `step` is the optimizer step number being taken (1 for the first). The store is not committed here:
        call `flush` and then `store.commit`. The step announces its phases to the event sink as it enters them.
        """
        clock = PhaseClock(self.on_event, step)
        read0, written0 = self._bytes_moved()
        started = time.perf_counter()
        forward = self._forward(micro_batches, clock)
        grad_norm = None
        grad_scale = 1.0
        clipping = self.optim.max_grad_norm is not None
        # Held: the measuring pass is the only backward, and every shard waits for its update.
        held: list[HeldShard] | None = [] if clipping and self.plan.holds_gradients and self.replicas is None else None
        if clipping:
            measured = self._backward(micro_batches, forward, step, lr_scale, clock, update=False, held=held)
            squared = measured.squared_norm if self.replicas is None else self.replicas.total(measured.squared_norm)
            grad_norm = squared**0.5
            grad_scale = min(1.0, self.optim.max_grad_norm / (grad_norm + 1e-6))
        if held is not None:
            ortho = max((self._finish_shard(h.name, h.layer, h.tensors, h.params, step, lr_scale, True, grad_scale,
                                            clock) for h in held), default=0.0)
            result = BackwardResult(loss=measured.loss, ortho_err=ortho, squared_norm=measured.squared_norm)
        else:
            result = self._backward(micro_batches, forward, step, lr_scale, clock, update=True, grad_scale=grad_scale)
        self.pager.drain_writes(clock)
        accounted = sum(clock.seconds.values())
        clock.seconds["other"] = max(0.0, time.perf_counter() - started - accounted)
        tokens = counted_targets(micro_batches) if self.workload == "lm" else 0
        loss, comm_s, comm_bytes = result.loss, 0.0, 0
        if self.replicas is not None:
            loss = self.replicas.mean(loss)
            stats = self.replicas.take_stats()
            comm_s, comm_bytes = stats.wait_s, stats.bytes_sent
        read1, written1 = self._bytes_moved()
        return StepResult(
            loss=loss, phase_s=clock.seconds, bytes_read=read1 - read0, bytes_written=written1 - written0,
            ortho_err=result.ortho_err, grad_norm=grad_norm, tokens=tokens, comm_s=comm_s, comm_bytes=comm_bytes,
        )

    def evaluate(self, windows: list[tuple[Tensor, Tensor]]) -> float:
        """Mean cross-entropy over the counted targets of all the batches of windows ((tokens, targets) pairs),
        forward only (targets equal to IGNORE_INDEX do not count).

        The batches run layer-major as a step's micro-batches do, so each paged block is read once for all.
        """
        if self.workload != "lm":
            raise ValueError("evaluate needs the language-model workload (the hidden-sum workload has no targets)")
        clock = PhaseClock()
        top = self._forward(windows, clock, turnaround=False).boundaries[-1]
        head = self.pager.get("head", clock)
        embed = self.pager.get("embed", clock)
        with torch.no_grad():
            sums = [F.cross_entropy(self._logits(head, embed, h).flatten(0, 1).float(), y.to(self.device).flatten(),
                                    reduction="sum") for (_, y), h in zip(windows, top, strict=True)]
        return float(torch.stack(sums).sum()) / max(1, counted_targets(windows))

    def _bytes_moved(self) -> tuple[int, int]:
        """Bytes read and written so far: the store's shards plus spilled activations."""
        spill_read, spill_written = (self.spill.bytes_read, self.spill.bytes_written) if self.spill else (0, 0)
        return self.store.bytes_read + spill_read, self.store.bytes_written + spill_written

    def _forward(self, micro_batches: list[MicroBatch], clock: PhaseClock, turnaround: bool = True) -> ForwardPass:
        """Every block over every micro-batch; with `turnaround`, what backward needs is kept (or spilled)."""
        graphs: dict[int, KeptGraph] = {}
        memos: dict[int, list[BlockMemo]] = {}
        if turnaround and self.memo_arena is not None:
            self.memo_arena.reset()  # the last step's memos were all replayed
        since = time.perf_counter()
        with torch.no_grad():
            if self.workload == "lm":
                embed = self.pager.get("embed", clock)
                since = time.perf_counter()
                hidden = [self._embed(embed, x.to(self.device)) for x, _ in micro_batches]
            else:
                hidden = [x.to(self.device) for x, _ in micro_batches]
            rope = self._rope(0, hidden[0].shape[1])
            boundaries = [hidden]
            order = list(range(self.n_layers))
            for pos, i in enumerate(order):
                self.pager.prefetch_window(order, pos, with_state=False)
                name = block_shard(i)
                since = clock.add("forward", since)
                weights = self.pager.get(name, clock)
                since = time.perf_counter()
                clock.enter("forward", i)
                self.pager.emit_state(name, "computing")
                if turnaround and i in self.plan.kept_layers:  # its graph is kept: backward needs no recompute
                    with torch.enable_grad():
                        params = {k: v.detach().requires_grad_() for k, v in weights.items()}
                        inputs = [h.detach().requires_grad_() for h in hidden]
                        outputs = [self._block(i, params, h, rope) for h in inputs]
                    graphs[i] = KeptGraph(params, inputs, outputs)
                    hidden = [o.detach() for o in outputs]
                elif turnaround and i in self.plan.memo_layers:  # backward recomputes it from these memos
                    memos[i] = [BlockMemo(arena=self.memo_arena) for _ in hidden]
                    hidden = [self._block(i, weights, h, rope, memo=m) for h, m in zip(hidden, memos[i], strict=True)]
                else:
                    hidden = [self._block(i, weights, h, rope) for h in hidden]
                boundaries.append(hidden)
                since = clock.add("forward", since)
                if self.spill is not None:
                    # Only a training step's backward needs block i's input again; evaluation drops it.
                    if turnaround:
                        clock.enter("spill", i)
                        self.spill.put(i, boundaries[i])
                    boundaries[i] = None
                    since = clock.add("spill", since)
                self.pager.put(name, weights, modified=False)
                del weights
                if turnaround and pos == len(order) - 1:
                    # Turn around: the backward pass starts from the last blocks.
                    back = order[::-1]
                    for j in back[: self.pager.prefetch_depth + 1]:
                        self.pager.prefetch(block_shard(j))
                        self.pager.prefetch(optim_shard(block_shard(j)))
        clock.add("forward", since)
        return ForwardPass(boundaries, graphs, memos)

    def _head_backward(self, micro_batches, top: list[Tensor], clock: PhaseClock, step, lr_scale, update,
                       grad_scale, held) -> tuple[list[Tensor], float, float, dict[str, Tensor] | None]:
        """Loss at the head: d loss / d top hidden state per micro-batch, the loss, the grad² sum, and, with a
        tied head, the embedding's gradient from the head (it completes through the lookup at the end)."""
        if self.workload == "hidden-sum":
            # The seeds' step: loss = sum of the final hidden states.
            loss = sum(float(h.sum()) for h in top)
            return [torch.ones_like(h) for h in top], loss, 0.0, None
        head = self.pager.get("head", clock)
        embed = self.pager.get("embed", clock) if self.head_template is None else None
        since = time.perf_counter()
        clock.enter("backward", None)
        params = {k: v.detach().requires_grad_() for k, v in head.items()}
        tied = None if embed is None else {k: v.detach().requires_grad_() for k, v in embed.items()}
        grads_out, total = [], 0.0
        chunk = chunk_tokens_for(self.config.vocab_size)
        # bfloat16 compute: the head's matrices cast once for every chunk (autocast would cast them per chunk).
        head_in_compute_dtype = [None if t is None else {k: v.to(self.compute_dtype) if v.ndim == 2 else v
                                                          for k, v in t.items()} for t in (params, tied)]
        # The loss is the mean over the step's counted targets, whichever micro-batch they are in; a step with
        # none (every answer cut off) has loss 0 and zero gradients rather than NaN.
        counted = counted_targets(micro_batches)
        for (_, y), h in zip(micro_batches, top, strict=True):
            mine = counted_targets([(None, y)])
            if mine == 0:
                grads_out.append(torch.zeros_like(h))
                continue
            # A few hundred tokens' logits at a time, never batch × seq × vocab (sct_edge/model/loss.py).
            logits = partial(self._logits, *head_in_compute_dtype)
            if y.is_floating_point():
                # Distilling, the teacher's and the student's logits of a chunk are alive together: half the
                # tokens a chunk keep the plan's logit working set.
                loss, grad = distill_loss_backward(h, y.to(self.device), logits, mine / counted, max(1, chunk // 2))
            else:
                loss, grad = lm_loss_backward(h, y.to(self.device), logits, mine / counted, chunk)
            total += loss
            grads_out.append(grad)
        for p in [*params.values(), *(tied or {}).values()]:
            if p.grad is None:  # every micro-batch was skipped: nothing counted, nothing moves
                p.grad = torch.zeros_like(p)
        clock.add("backward", since)
        done = self._shard_done("head", None, head, params, step, lr_scale, update, grad_scale, clock, held)
        squared = 0.0 if update else done  # updating, `done` is the head's orthonormality error, not a norm
        tied_grads = None if tied is None else {k: v.grad for k, v in tied.items()}
        return grads_out, total, squared, tied_grads

    def _shard_done(self, name, layer, tensors, params, step, lr_scale, update, grad_scale, clock,
                    held: list[HeldShard] | None = None) -> float:
        """A shard's local gradients are complete. Updating: its orthonormality error after the update; measuring:
        its squared gradient norm, and with `held` the shard stays out with its gradients, appended there for
        the update. Across replicas both arrive through `ReplicaSync.drain` instead (0 here)."""
        if self.replicas is not None:
            finish = None
            if update:
                def finish() -> float:
                    return self._finish_shard(name, layer, tensors, params, step, lr_scale, True, grad_scale, clock)
            def put(modified: bool) -> None:
                self.pager.put(name, tensors, modified)
            self.replicas.submit(name, tensors, params, finish, put)
            return 0.0
        if update:
            return self._finish_shard(name, layer, tensors, params, step, lr_scale, True, grad_scale, clock)
        squared = sum(float(p.grad.pow(2).sum()) for p in params.values())
        if held is not None:
            held.append(HeldShard(name, layer, tensors, params))
        else:
            for p in params.values():
                p.grad = None  # a kept graph's parameters live on to the updating pass; their gradients need not
            self.pager.put(name, tensors, modified=False)
        return squared

    def _finish_shard(self, name, layer, tensors, params, step, lr_scale, update, grad_scale, clock) -> float:
        """A shard's gradients are complete: AdamW + retraction on its parameters, then put it back.

        The one point per shard (block `layer`, or the head or embedding with layer None) where gradients are
        final and the update happens.
        """
        ortho = 0.0
        if update:
            state = self.pager.get(optim_shard(name), clock)
            since = time.perf_counter()
            clock.enter("optimizer", layer)
            weights = {k: tensors[k] for k in params}
            grads = {k: p.grad for k, p in params.items()}
            with torch.no_grad():
                adamw_update(weights, grads, {k: state[f"{k}.exp_avg"] for k in params},
                             {k: state[f"{k}.exp_avg_sq"] for k in params}, step, self.optim, lr_scale, grad_scale)
            since = clock.add("optimizer", since)
            clock.enter("retraction", layer)
            factors = [weights[k] for k in weights if is_orthonormal_factor(k)]
            if factors:
                with torch.no_grad():
                    ortho = retract_(factors).max_error
            clock.add("retraction", since)
            self.pager.put(optim_shard(name), state, modified=True)
        self.pager.put(name, tensors, modified=update)
        return ortho

    def _backward(
        self, micro_batches, forward: ForwardPass, step, lr_scale, clock, update: bool, grad_scale: float = 1.0,
        held: list[HeldShard] | None = None,
    ) -> BackwardResult:
        """Reverse pass. With update=False nothing changes: it only measures the squared global gradient norm,
        and with `held` it is the step's only pass: every shard and its gradients go there for the update."""
        boundaries = forward.boundaries
        grads, loss, squared, tied_grads = self._head_backward(micro_batches, boundaries[-1], clock, step, lr_scale,
                                                               update, grad_scale, held)
        last_pass = update or held is not None
        ortho = 0.0
        rope = self._rope(0, boundaries[-1][0].shape[1])
        order = list(range(self.n_layers))[::-1]
        for pos, i in enumerate(order):
            name = block_shard(i)
            self.pager.prefetch_window(order, pos, with_state=update)
            tensors = self.pager.get(name, clock)
            since = time.perf_counter()
            self.pager.emit_state(name, "computing")
            if i in forward.graphs:
                clock.enter("backward", i)
                # A measuring pass followed by an updating one leaves the graph for it.
                graph = forward.graphs.pop(i) if last_pass else forward.graphs[i]
                params = graph.params
                for p in list(params.values()) + graph.inputs:
                    p.grad = None
                for out, g in zip(graph.outputs, grads, strict=True):
                    out.backward(g, retain_graph=not last_pass)
                grads = [h.grad for h in graph.inputs]
                for h in graph.inputs:
                    h.grad = None  # passed on below; the kept graph need not hold it too
            else:
                if boundaries[i] is None:
                    clock.enter("spill", i)
                    inputs = self.spill.get(i)
                    since = clock.add("spill", since)
                else:
                    inputs = boundaries[i]
                clock.enter("backward", i)
                params = {k: v.detach().requires_grad_() for k, v in tensors.items()}
                memos = (forward.memos.pop(i, None) if last_pass else forward.memos.get(i)) or [None] * len(inputs)
                new_grads = []
                for h, g, memo in zip(inputs, grads, memos, strict=True):
                    h = h.detach().requires_grad_()
                    self._block(i, params, h, rope, memo=memo).backward(g)
                    new_grads.append(h.grad)
                grads = new_grads
            since = clock.add("backward", since)
            done = self._shard_done(name, i, tensors, params, step, lr_scale, update, grad_scale, clock, held)
            ortho, squared = (max(ortho, done), squared) if update else (ortho, squared + done)
            del params, tensors
        if self.workload == "lm":
            embed = self.pager.get("embed", clock)
            since = time.perf_counter()
            clock.enter("backward", None)
            params = {k: v.detach().requires_grad_() for k, v in embed.items()}
            for (x, _), g in zip(micro_batches, grads, strict=True):
                self._embed(params, x.to(self.device)).backward(g)
            if tied_grads is not None:
                for k, g in tied_grads.items():
                    params[k].grad += g
            clock.add("backward", since)
            done = self._shard_done("embed", None, embed, params, step, lr_scale, update, grad_scale, clock, held)
            ortho, squared = (max(ortho, done), squared) if update else (ortho, squared + done)
        if self.replicas is not None:
            since = time.perf_counter()
            replica_ortho, squared = self.replicas.drain()
            ortho = max(ortho, replica_ortho)
            clock.add("exchange", since)
        return BackwardResult(loss=loss, ortho_err=ortho, squared_norm=squared)
