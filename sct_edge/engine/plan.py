"""The memory plan: how many blocks stay in RAM under a profile's budget, what the peak is, and the I/O a step costs.

The scheduler follows it and `memcalc` prints it; both call `make_plan`. Every figure is in bytes.

What RAM holds during a step (the terms of `MemoryPlan`):

- resident blocks: each one's fp32 weights (4 B a stored parameter) and two AdamW moments (2 × state dtype
  bytes a parameter). All blocks stay resident when they fit, and then nothing is paged.
- in-flight blocks, only when paging: `prefetch_depth` read ahead + 1 being computed + 1 being written back,
  each the size of a resident block (backward reads weights and moments, the optimizer updates both).
- one block's gradients (4 B a parameter): blocks are backpropagated, stepped and released one at a time.
  Global-norm clipping needs every gradient before the first update: when every block is resident and the
  budget has room, the step holds all blocks' gradients until backward ends (`held_gradient_bytes`, the
  other blocks' gradients) and backpropagates once; otherwise a first backward pass measures the norm and
  the second one updates (no memory, one more backward a step).
- embedding, LM head and final norm ("lm" workload): weights, moments and gradients, always resident.
- boundary activations: each block's input for every micro-batch, (n_layers + 1) × micro-batches × batch ×
  seq × dim elements (with `activations = spill`, which writes them to disk, only two per micro-batch stay in
  RAM: the input of the block being computed and the last block's output), plus the gradient waiting at the
  current boundary for every micro-batch.
- one block's backward working set (`block_saved_elements` + `backward_transient_elements`); with
  `activations = keep` each resident block also keeps its forward graph (its saved tensors) until backward,
  and only a paged block is recomputed. With `auto`, when every block is resident but not every graph fits,
  the last blocks keep theirs as far as the budget's room goes (`kept_blocks`) and the others recompute: the
  kept graphs are freed by the time backward reaches a recomputed block. Before any graph, with `auto` and
  every block resident, each recomputed block's forward leaves a memo for its recompute
  (`block_memo_tensors`, `sct_edge/model/memo.py`): the attention output, the rank-wide x·U of q, k, v and o
  and the MLP's rank-wide tensors, which spare the recompute its attention kernel, those products and the FFN
  slices for far fewer bytes than a kept graph.
- the logits working set ("lm"): the loss is taken a chunk of tokens at a time (`sct_edge/model/loss.py`),
  so one chunk's float32 logits, log-softmax and their gradient (3 × chunk × vocab × 4 B, plus the
  compute-dtype logits and the head's matrices cast once when that is not float32) and the head's gradient
  of that chunk before it is added to the accumulated one. The loss is done before the first block's backward
  starts, so the peak counts the larger of this and a block's backward (its gradients and working set), not
  both.
- the runtime: `RUNTIME_OVERHEAD_BYTES` for the Python + torch process itself.
- malloc's heap slack, only when nothing is paged and the budget has room for it: the hidden-state-sized
  tensors of a step (a block's input, q, the attention output, their gradients) and the loss chunk's are then
  served from malloc's heap instead of fresh mmaps (`heap_tensor_limit`), and the heap keeps freed ones for
  reuse: up to `HEAP_SLACK_TENSORS` hidden-state tensors more than the live set at the peak.
- across replicas (torchrun, `replicas` > 1): the gradient exchange keeps two shards in flight behind the
  backward (`sct_edge/parallel/replicas.py`): per shard a gradient bucket (float32, or bfloat16 with
  `grad_dtype`), a weight bucket for the broadcast, and on the owner the averaged gradients; those two shards'
  weights and gradients stay in RAM until their exchange ends.

Activation elements are counted at 4 B whatever the compute dtype: bfloat16 compute runs the products under
autocast, which keeps the residual stream, the norms and RoPE in float32 and saves bfloat16 copies of the
products' inputs beside them, so the float32 count is the closer bound. The formulas were checked against
autograd's saved tensors and the process's peak RSS in float32 on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from sct_edge.engine.malloc import NO_TRIM, STEP_MALLOC, MallocThresholds
from sct_edge.engine.profile import DTYPE_BYTES, Profile
from sct_edge.errors import SctError
from sct_edge.model.accounting import (
    CHUNK_LOGIT_BYTES,
    MEMO_ALIGN_BYTES,
    MLP_SLICE_COLUMNS,
    GiB,
    MiB,
    block_matrices,
    chunk_tokens_for,
    count_params,
    format_bytes,
    mlp_in_slices,
)
from sct_edge.model.config import ModelConfig

# The Python + torch process before any model tensor: RSS after `import torch, sct_edge.model.transformer` measured
# 220 MiB, but a training process also maps torch's kernels as it first uses them, the corpus, tqdm or the
# Textual UI: a `tiny` run (whose tensors are a few MB) peaked at 289 MiB headless and 303 MiB in the TUI
# (Linux x86-64, Python 3.11, torch 2.13.0+cpu). Rounded up to cover both.
RUNTIME_OVERHEAD_BYTES = 320 * MiB

# Freed heap chunks malloc holds beyond the live tensors at the peak, in hidden-state tensors (one micro-batch's
# block input), when those come from the heap. Measured on llama3-8b r128, the streamed step with every block
# resident, against the same step with each of them a fresh mmap (6,260 and 6,325 MiB at 4 × 512, 7,777 MiB at
# 4 × 1024): at 4 × 512 (32 MiB tensors) peak RSS 6,512, 6,587 and 7,219 MiB (6 to 28 tensors more) and the
# step 67.6, 78.9 and 67.5 against 79.5 and 81.8 s; at 4 × 1024 (64 MiB) 8,680 MiB (14 tensors more) and the
# step 145.3 against 192.0 s. The time is page faults: the kernel zeroes every page of a fresh mmap. How much
# the heap keeps varies from run to run, so the allowance covers the largest seen, with room.
HEAP_SLACK_TENSORS = 32

# A forward graph kept beside the heap-served hidden-state tensors costs more than its saved tensors: the
# tensors freed between kept ones leave holes in the heap that it cannot hand back. Measured on llama3-8b r128
# at 4 x 512 (steamdeck): keeping the last 11 graphs of 264 MB raised the peak RSS by 3,702 MiB, 1.34 times
# their saved tensors (10,780 MiB against 7,078 without them). Since RMSNorm saves only its input and rstd
# (`sct_edge/model/rmsnorm.py`), a graph is 188 MiB and the holes weigh more: 8 graphs beside 24 memos peaked
# at 10,459 MiB, 1.58 times the graphs' saved tensors on top of the rest of the plan; 7 graphs, in four runs
# under a 10 GiB cap, 9,917 to 10,305 MiB against a plan of 10,224 (up to 1.66 times), and one of them was
# OOM-killed. Counted at 1.7.
KEPT_GRAPH_HEAP_FACTOR = 1.7

# Tokens a micro-batch up to which a paged step computes on one thread fewer (`MemoryPlan.compute_threads`).
SMALL_STEP_TOKENS = 64
DEFAULT_READ_BYTES_PER_S = 1.2e9
DEFAULT_WRITE_BYTES_PER_S = 2.1e9
# "lm": the language model, tokens in, next-token loss. "hidden-sum": the seeds' 70B-class step, decoder blocks
# only, random hidden states in, loss = the sum of the last block's output.
WORKLOADS = ("lm", "hidden-sum")
# Run events and `bench step --json` lines written before the rename call "hidden-sum" "seed".
FORMER_WORKLOAD_NAMES = {"seed": "hidden-sum"}
FP32 = 4


def _mlp_sliced(config: ModelConfig, layer: int, batch: int, seq: int, element_bytes: int) -> bool:
    """Whether block `layer`'s MLP runs in FFN slices (`sct_edge/model/swiglu.py`): all three spectral, and large."""
    spectral = all(rank is not None for path, _, _, rank in block_matrices(config, layer) if ".mlp." in path)
    return spectral and mlp_in_slices(batch * seq, config.ffn_dim, element_bytes)


def block_saved_elements(config: ModelConfig, layer: int, batch: int, seq: int, element_bytes: int = FP32) -> int:
    """Elements autograd saves inside block `layer` for one forward of batch × seq (parameters excluded).

    Counted from the model's forward (CPU, torch 2.13), per token:
      attention RMSNorm: its input x (the block input) and rstd (1), and its output, which the products
        save (`sct_edge/model/rmsnorm.py`);                                        2·dim + 1
      causal attention: q and k after RoPE, v, the attention output, and the softmax log-sum-exp per head
        (RoPE itself saves only the cos/sin tables, 2 × seq × head_dim for the whole batch);
                                                                  2·dim + 2·kv_dim + n_heads
      additive attention o(q + k + v): the sum fed to o;                             dim
      MLP RMSNorm: the residual h, rstd, its output;                               2·dim + 1
      SwiGLU: gate output, silu(gate), up output, the product fed to down;        4·ffn_dim
        or, run in FFN slices (`_mlp_sliced`): x·U of gate and up and down's
        rank-wide accumulator, and nothing of gate, up and down themselves;  k_gate + k_up + k_down
      each spectral matrix: x·U and (x·U)·s;                                        2·rank
    A dense matrix saves only its input, which is already counted.
    """
    d, kv, f = config.dim, config.kv_dim, config.ffn_dim
    sliced = _mlp_sliced(config, layer, batch, seq, element_bytes)
    per_token = 2 * d + 1 + 2 * d + 1
    for path, _, _, rank in block_matrices(config, layer):
        if rank is not None:
            per_token += rank if sliced and ".mlp." in path else 2 * rank
    per_token += 0 if sliced else 4 * f
    tables = 0
    if config.attention == "additive":
        per_token += d
    else:
        per_token += 2 * d + 2 * kv + config.n_heads
        tables = 2 * seq * config.head_dim
    return batch * seq * per_token + tables


def block_memo_tensors(config: ModelConfig, layer: int, batch: int, seq: int, element_bytes: int = FP32) -> list[int]:
    """Elements of each tensor block `layer`'s memo holds for one micro-batch of batch × seq
    (`sct_edge/model/memo.py`). Causal attention: its output and per-head log-sum-exp (dim and n_heads a
    token), x·U of q, k and v when all three are spectral (k_q, k_k, k_v) and the output · U of a spectral o
    (k_o). With the MLP in FFN slices: x·U of gate and up and down's rank-wide accumulator (k_gate, k_up, k_down).
    Additive attention records nothing."""
    tokens = batch * seq
    ranks = {path: config.ranks.rank_of(f"layers.{layer}.{path}") for path in config.matrix_shapes()}
    per_token = []
    if config.attention != "additive":
        per_token += [config.dim, config.n_heads]
        qkv = [ranks[f"attn.{m}"] for m in "qkv"]
        if None not in qkv:
            per_token += qkv
        if ranks["attn.o"] is not None:
            per_token.append(ranks["attn.o"])
    if _mlp_sliced(config, layer, batch, seq, element_bytes):
        per_token += [ranks[f"mlp.{m}"] for m in ("gate", "up", "down")]
    return [tokens * n for n in per_token]


def backward_transient_elements(config: ModelConfig, batch: int, seq: int, element_bytes: int = FP32) -> int:
    """Elements alive during one block's backward on top of what autograd saved: two ffn-wide gradients.

    Measured: the peak RSS of forward + backward of one block exceeds its saved tensors by 2 × batch × seq ×
    max(ffn_dim, dim) × 4 bytes (dim 1024 / ffn 2816, 4096, 8192 and dim 2048 / ffn 2048, seq 2048, glibc
    with MALLOC_MMAP_THRESHOLD_=65536 so RSS follows live tensors). With the MLP in FFN slices the ffn-wide
    gradients become slice-wide, and the transient is counted as one dim-wide gradient plus one slice's
    tensors (its gate, up, SiLU and product gradients: 6 × batch × seq × MLP_SLICE_COLUMNS). Since q, k and v
    (and gate and up) sum their input gradients into one tensor (`SharedInputProjections`), one llama3-8b r128
    block's forward + backward at 4 × 2048 peaks 312 MiB above its saved tensors, against 527 MiB before; with
    two dim-wide gradients the whole plan kept 27 blocks resident and was 5.9 % above the measured peak (10,135
    against 9,568 MiB under a 10 GiB cap), with one it keeps all 32 and is 0.9 % above (10,128 against 10,042).
    """
    tokens = batch * seq
    if all(_mlp_sliced(config, i, batch, seq, element_bytes) for i in range(config.n_layers)):
        return tokens * config.dim + 6 * tokens * MLP_SLICE_COLUMNS
    return 2 * tokens * max(config.ffn_dim, config.dim)


def suggest_budget(minimum: int) -> str:
    """A round budget string at or above `minimum` bytes: 64 MiB steps below 1 GiB, quarter GiB above."""
    if minimum < GiB:
        return f"{math.ceil(minimum / (64 * MiB)) * 64}MiB"
    return f"{math.ceil(minimum / (GiB / 4)) / 4:g}GiB"


@dataclass
class MemoryPlan:
    """Residency, peak RAM and per-step I/O of training `model` under `profile` (see the module docstring)."""

    model: str
    profile: str
    workload: str
    batch: int
    seq: int
    micro_batches: int
    budget_bytes: int
    n_layers: int
    compute_dtype: str
    state_dtype: str
    activations: str  # the policy the step runs: keep, recompute or spill
    activations_auto: bool  # whether the profile left the choice to the plan (`auto`)
    block_params: int  # stored parameters of the largest block
    block_weight_bytes: int
    block_moment_bytes: int
    block_grad_bytes: int
    embed_head_params: int
    embed_head_bytes: int  # weights + moments + gradients of embedding, LM head and final norm
    resident_blocks: int
    prefetch_depth: int  # effective read-ahead; 0 when nothing is paged
    inflight_blocks: int  # buffers for paged blocks; 0 when nothing is paged
    boundary_activation_bytes: int
    boundary_grad_bytes: int
    kept_blocks: int  # blocks whose forward graph is kept for backward, not recomputed (see `kept_layers`)
    kept_activation_bytes: int  # those blocks' forward graphs
    memo_blocks: int  # recomputed blocks whose forward leaves a memo for the recompute (see `memo_layers`)
    memo_bytes: int  # those memos
    block_working_set_bytes: int
    logits_bytes: int
    runtime_overhead_bytes: int
    heap_tensor_limit: int  # the largest allocation malloc serves from its heap (its mmap threshold)
    heap_slack_bytes: int  # freed heap chunks kept for reuse at the peak (0 when the threshold is the default)
    replicas: int  # ranks training the model together (1: a single process)
    comm_buffer_bytes: int  # across replicas: exchange buckets and the shards held in flight
    clip: bool  # whether the step clips the global gradient norm
    holds_gradients: bool  # clipping: every gradient held until backward ends (one backward pass, not two)
    held_gradient_bytes: int  # the gradients held beyond one block's
    predicted_peak_bytes: int
    store_bytes: int
    io_read_bytes_per_step: int
    io_write_bytes_per_step: int
    read_bytes_per_s: float
    write_bytes_per_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def pages_blocks(self) -> bool:
        """Whether some blocks are paged (read and written back every step): then the pager trims malloc's
        arenas before each load, or the memory the paged blocks free would stay in the resident set."""
        return self.resident_blocks < self.n_layers

    def compute_threads(self, threads: int) -> int:
        """torch's compute threads for this plan's step, of the `threads` the process may use.

        When blocks are paged, the pager's I/O thread moves gigabytes a step through the kernel on one of the
        cores. With at most `SMALL_STEP_TOKENS` tokens a micro-batch every op is small and memory-bound, and a
        team of compute threads waits at each op for whichever core the I/O thread holds, so the step computes
        on one thread fewer. sct-70b r32 under a 1 GiB cap, one thread against two: 5.73 s against 7.82 s at
        1 x 8 tokens, 7.74 against 9.25 s at 1 x 32; from 1 x 128 (21.3 against 20.1 s) on, two win.
        """
        if self.pages_blocks and threads > 1 and self.batch * self.seq <= SMALL_STEP_TOKENS:
            return threads - 1
        return threads

    @property
    def malloc(self) -> MallocThresholds:
        """glibc malloc's thresholds for the step this plan runs (`configure_process` applies them): with the
        hidden-state tensors on the heap, a heap that is never trimmed (`NO_TRIM`)."""
        trim = NO_TRIM if self.heap_slack_bytes else STEP_MALLOC.trim_bytes
        return MallocThresholds(mmap_bytes=self.heap_tensor_limit, trim_bytes=trim)

    @property
    def block_resident_bytes(self) -> int:
        return self.block_weight_bytes + self.block_moment_bytes

    @property
    def paging(self) -> bool:
        return self.resident_blocks < self.n_layers

    @property
    def resident_layers(self) -> range:
        """The layers kept in RAM for the whole run: the first `resident_blocks`."""
        return range(self.resident_blocks)

    @property
    def kept_layers(self) -> range:
        """The blocks whose forward graph is kept for backward: with keep, every resident one; with auto and
        only room for some, the last ones (backward reaches them first, so their graphs are gone before any
        other block is recomputed)."""
        if self.activations == "keep":
            return range(self.resident_blocks)
        return range(self.n_layers - self.kept_blocks, self.n_layers)

    @property
    def memo_layers(self) -> range:
        """The blocks whose no-grad forward records a memo that their recompute replays: the first
        `memo_blocks`, never a kept one."""
        return range(self.memo_blocks)

    @property
    def io_bytes_per_step(self) -> int:
        return self.io_read_bytes_per_step + self.io_write_bytes_per_step

    @property
    def io_seconds_per_step(self) -> float:
        """Disk time of one step's I/O at the stated speeds, with no overlap (prefetching hides part of it)."""
        return (
            self.io_read_bytes_per_step / self.read_bytes_per_s + self.io_write_bytes_per_step / self.write_bytes_per_s
        )

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.predicted_peak_bytes

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name in ("block_resident_bytes", "paging", "io_bytes_per_step", "io_seconds_per_step", "headroom_bytes"):
            data[name] = getattr(self, name)
        return data

    def describe(self) -> list[str]:
        """The plan as lines for people (binary units: MiB, GiB)."""
        b = format_bytes
        mb = f" × {self.micro_batches} micro-batches" if self.micro_batches > 1 else ""
        lines = [
            f"plan: {self.model} under profile {self.profile} (budget {b(self.budget_bytes)}), workload "
            f"{self.workload}, batch {self.batch} × seq {self.seq}{mb}, compute {self.compute_dtype}, "
            f"activations {self.activations}" + (" (auto)" if self.activations_auto else ""),
            f"  one block: {self.block_params:,} params → weights {b(self.block_weight_bytes)} + AdamW moments "
            f"{b(self.block_moment_bytes)} ({self.state_dtype}) = {b(self.block_resident_bytes)}; "
            f"its gradients {b(self.block_grad_bytes)} (one block at a time)",
        ]
        if self.paging:
            lines.append(
                f"  resident blocks: {self.resident_blocks} of {self.n_layers} "
                f"({b(self.resident_blocks * self.block_resident_bytes)}); the other "
                f"{self.n_layers - self.resident_blocks} are paged"
            )
            lines.append(
                f"  in-flight blocks: {self.inflight_blocks} (prefetch {self.prefetch_depth} + computing + writing "
                f"back) = {b(self.inflight_blocks * self.block_resident_bytes)}"
            )
        else:
            lines.append(
                f"  resident blocks: all {self.n_layers} ({b(self.n_layers * self.block_resident_bytes)}): "
                f"no paging, no I/O"
            )
        if self.workload == "lm":
            lines.append(
                f"  embedding + LM head + final norm: {self.embed_head_params:,} params = {b(self.embed_head_bytes)} "
                f"(weights, moments, gradients)"
            )
        lines.append(
            f"  boundary activations: {b(self.boundary_activation_bytes)}"
            + (" (spilled to disk)" if self.activations == "spill" else "")
            + f"; boundary gradients {b(self.boundary_grad_bytes)}"
        )
        if self.kept_activation_bytes and self.activations == "keep":
            lines.append(f"  kept forward graphs of resident blocks (keep): {b(self.kept_activation_bytes)}")
        elif self.kept_activation_bytes:
            lines.append(f"  kept forward graphs of the last {self.kept_blocks} blocks (the budget's room; the other "
                         f"{self.n_layers - self.kept_blocks} recompute): {b(self.kept_activation_bytes)}")
        if self.memo_bytes:
            lines.append(f"  memos of {self.memo_blocks} recomputed blocks (attention output, rank-wide products): "
                         f"{b(self.memo_bytes)}")
        lines.append(f"  one block's backward working set: {b(self.block_working_set_bytes)}")
        if self.workload == "lm":
            lines.append(f"  logits working set: {b(self.logits_bytes)} (freed before any block's backward)")
        if self.holds_gradients:
            lines.append(f"  gradients of every block held for clipping: {b(self.held_gradient_bytes)} more "
                         f"(one backward pass a step)")
        elif self.clip:
            lines.append("  clipping: a first backward pass measures the gradient norm (no room to hold every "
                         "gradient)")
        if self.replicas > 1:
            lines.append(f"  gradient exchange across {self.replicas} replicas (two shards in flight): "
                         f"{b(self.comm_buffer_bytes)}")
        lines.append(f"  runtime (Python + torch): {b(self.runtime_overhead_bytes)}")
        if self.heap_slack_bytes:
            lines.append(f"  malloc heap slack: {b(self.heap_slack_bytes)} (tensors up to {b(self.heap_tensor_limit)} "
                         f"are reused from the heap, not mapped afresh)")
        lines.append(
            f"  predicted peak RSS: {b(self.predicted_peak_bytes)} of {b(self.budget_bytes)} "
            f"(headroom {b(self.headroom_bytes)})"
        )
        lines.append(f"  store on disk (weights + moments): {b(self.store_bytes)}")
        lines.append(
            f"  I/O per step: read {b(self.io_read_bytes_per_step)}, written {b(self.io_write_bytes_per_step)}; "
            f"{self.io_seconds_per_step:.2f} s at {self.read_bytes_per_s / 1e9:g} GB/s read, "
            f"{self.write_bytes_per_s / 1e9:g} GB/s write (no overlap)"
        )
        lines.extend(f"  note: {note}" for note in self.notes)
        return lines


@dataclass
class _StepCosts:
    """The residency-independent terms of a plan, shared by `make_plan` and `minimum_budget`."""

    block_stored: list[int]  # stored parameters of each block
    block_params: int  # of the largest block
    resident_per_param: int  # fp32 weight + two moments in the state dtype
    block_bytes: int  # weights + moments of the largest block
    grad_bytes: int
    embed_head_params: int
    embed_head_bytes: int
    boundary_tensor: int  # one block input of one micro-batch
    boundary: int
    boundary_grad: int
    saved: int  # one block's autograd-saved tensors
    memo_per_block: int  # one block's memos for every micro-batch
    transient: int
    cast: int
    logits: int
    kept_per_block: int  # a block's forward graph kept for backward (its saved tensors less its input)

    @property
    def base(self) -> int:
        """Always in RAM: runtime, embedding/head, boundary activations and gradients."""
        return RUNTIME_OVERHEAD_BYTES + self.embed_head_bytes + self.boundary + self.boundary_grad

    def phase_peak(self, working: int) -> int:
        """The larger of two phases that never overlap: the loss (one chunk of logits, taken before any block's
        backward starts and freed by then) and one block's backward (its gradients and `working` set)."""
        return max(self.logits, self.grad_bytes + working)

    @property
    def paging_working_set(self) -> int:
        """Backward of a paged block: it is always recomputed from its input."""
        return self.saved + self.transient + self.cast


def _check_inputs(config: ModelConfig, batch: int, seq: int, micro_batches: int, workload: str) -> None:
    config.validate()
    for name, value in (("batch", batch), ("seq", seq), ("micro_batches", micro_batches)):
        if not isinstance(value, int) or value < 1:
            raise SctError(f"{name} must be a positive integer, not {value!r}")
    if workload not in WORKLOADS:
        raise SctError(f"workload must be one of {', '.join(WORKLOADS)}, not '{workload}'")
    if seq > config.max_seq_len:
        raise SctError(f"seq {seq} is longer than {config.name}'s max_seq_len {config.max_seq_len}")


def _step_costs(
    config: ModelConfig, profile: Profile, batch: int, seq: int, micro_batches: int, workload: str, activations: str
) -> _StepCosts:
    _check_inputs(config, batch, seq, micro_batches, workload)
    state_bytes = DTYPE_BYTES[profile.state_dtype]
    act_bytes = FP32  # see the module docstring: bfloat16 compute keeps float32 activations too
    count = count_params(config)
    block_params = max(count.block_stored)
    embed_head_params = count.embed.stored + count.head.stored + count.final_norm.stored if workload == "lm" else 0
    boundary_tensor = batch * seq * config.dim * act_bytes
    saved = max(block_saved_elements(config, i, batch, seq, act_bytes) for i in range(config.n_layers)) * act_bytes
    # Each memo tensor starts on a cache line of the step's memo arena.
    memo = max(sum(n * act_bytes + MEMO_ALIGN_BYTES for n in block_memo_tensors(config, i, batch, seq, act_bytes))
               for i in range(config.n_layers))
    return _StepCosts(
        block_stored=count.block_stored,
        block_params=block_params,
        resident_per_param=FP32 + 2 * state_bytes,
        block_bytes=block_params * (FP32 + 2 * state_bytes),
        grad_bytes=block_params * FP32,
        embed_head_params=embed_head_params,
        embed_head_bytes=embed_head_params * (FP32 + 2 * state_bytes + FP32),
        boundary_tensor=boundary_tensor,
        boundary=(2 if activations == "spill" else config.n_layers + 1) * micro_batches * boundary_tensor,
        boundary_grad=micro_batches * boundary_tensor,
        saved=saved,
        memo_per_block=micro_batches * memo,
        transient=backward_transient_elements(config, batch, seq, act_bytes) * act_bytes,
        # bfloat16 compute works on a bf16 copy of the computing block's fp32 weights.
        cast=block_params * 2 if profile.compute_dtype == "bfloat16" else 0,
        logits=logits_working_set(config, batch * seq, count.head.stored or count.embed.stored,
                                  DTYPE_BYTES[profile.compute_dtype])
        if workload == "lm" else 0,
        # A block that keeps its forward graph holds it until backward (its input is a boundary activation
        # already); a paged block always recomputes, since its weights leave RAM between the passes.
        kept_per_block=micro_batches * (saved - boundary_tensor),
    )


def logits_working_set(config: ModelConfig, tokens: int, head_params: int, act_bytes: int) -> int:
    """Bytes the chunked loss holds at once for a micro-batch of `tokens` tokens (see the module docstring)."""
    chunk = min(tokens, chunk_tokens_for(config.vocab_size))
    cast = act_bytes if act_bytes != FP32 else 0
    return chunk * config.vocab_size * (3 * FP32 + cast) + head_params * (FP32 + cast)


def minimum_budget(
    config: ModelConfig, profile: Profile, batch: int, seq: int, micro_batches: int = 1, workload: str = "lm"
) -> int:
    """The smallest budget `make_plan` accepts: the fixed costs plus one in-flight block, nothing resident."""
    policies = ("recompute", "spill") if profile.activations == "auto" else (profile.activations,)
    return min(_minimum_bytes(config, profile, batch, seq, micro_batches, workload, p) for p in policies)


def _minimum_bytes(
    config: ModelConfig, profile: Profile, batch: int, seq: int, micro_batches: int, workload: str, activations: str
) -> int:
    costs = _step_costs(config, profile, batch, seq, micro_batches, workload, activations)
    return min(
        costs.base + costs.phase_peak(costs.paging_working_set) + costs.block_bytes,
        _all_resident_bytes(costs, config.n_layers, activations == "keep"),
    )


def resolve_activations(
    config: ModelConfig, profile: Profile, batch: int, seq: int, micro_batches: int, workload: str
) -> str:
    """The profile's activation policy, with `auto` decided: keep when the whole model and every block's
    kept forward graph fit the budget (nothing is paged, and backward needs no recompute); else recompute
    when one block fits beside the boundary activations held in RAM; else spill, which writes them to disk
    (disk traffic rather than a refusal)."""
    if profile.activations != "auto":
        return profile.activations
    costs = _step_costs(config, profile, batch, seq, micro_batches, workload, "keep")
    if _all_resident_bytes(costs, config.n_layers, keep=True) <= profile.memory_budget:
        return "keep"
    args = (config, profile, batch, seq, micro_batches, workload)
    return "recompute" if _minimum_bytes(*args, "recompute") <= profile.memory_budget else "spill"


def _all_resident_bytes(costs: _StepCosts, n_layers: int, keep: bool) -> int:
    working = costs.transient + costs.cast + (0 if keep else costs.saved)
    kept = costs.kept_per_block if keep else 0
    return costs.base + costs.phase_peak(working) + n_layers * (costs.block_bytes + kept)


def make_plan(
    config: ModelConfig,
    profile: Profile,
    batch: int,
    seq: int,
    micro_batches: int = 1,
    workload: str = "lm",
    read_bytes_per_s: float = DEFAULT_READ_BYTES_PER_S,
    write_bytes_per_s: float = DEFAULT_WRITE_BYTES_PER_S,
    replicas: int = 1,
    grad_dtype: str = "float32",
    clip: bool = False,
) -> MemoryPlan:
    """Plan residency and predict peak RAM and I/O for one optimizer step of `micro_batches` × batch × seq.

    Residency: every block when all fit beside the fixed costs; otherwise
    resident = floor((budget − fixed costs − in-flight window) / resident bytes of a block), with the window
    shrunk below prefetch_depth + 2 blocks only when the budget cannot hold it (a resident block's bytes
    include its kept forward graph with `activations = keep`). With `clip` (global-norm clipping), a plan that
    keeps every block resident in one process also holds every block's gradients when they fit. A budget that
    cannot hold even one in-flight block is a `SctError` naming the smallest budget that works (`minimum_budget`).
    """
    if read_bytes_per_s <= 0 or write_bytes_per_s <= 0:
        raise SctError("disk read and write speeds must be more than 0 bytes/s")
    activations = resolve_activations(config, profile, batch, seq, micro_batches, workload)
    c = _step_costs(config, profile, batch, seq, micro_batches, workload, activations)
    n = config.n_layers
    keep = activations == "keep"
    per_resident = c.block_bytes + (c.kept_per_block if keep else 0)
    budget = profile.memory_budget
    notes: list[str] = []
    if _all_resident_bytes(c, n, keep) <= budget:
        resident, inflight, prefetch = n, 0, 0
        working = c.transient + c.cast + (0 if keep else c.saved)
    else:
        working = c.paging_working_set
        room = budget - c.base - c.phase_peak(working)
        if room < c.block_bytes:
            minimum = c.base + c.phase_peak(working) + c.block_bytes
            mb = f" × {micro_batches} micro-batches" if micro_batches > 1 else ""
            raise SctError(
                f"budget {format_bytes(budget)} is below the {format_bytes(minimum)} {config.name} needs for one "
                f"block at batch {batch} × seq {seq}{mb} (profile {profile.name}); "
                f"try --budget {suggest_budget(minimum)}"
            )
        window = min(profile.prefetch_depth + 2, n, room // c.block_bytes)
        resident = min(n - 1, (room - window * c.block_bytes) // per_resident)
        inflight = min(window, n - resident)
        prefetch = max(0, inflight - 2)
        if room // c.block_bytes < min(profile.prefetch_depth + 2, n):
            notes.append(
                f"the budget leaves room for {window} in-flight block(s): prefetch depth {prefetch}, "
                f"not the profile's {profile.prefetch_depth}"
            )
    comm = 0
    if replicas > 1:
        shards_in_flight = 2  # one exchanging while the next block's backward runs, one being broadcast
        bucket = c.block_params * (DTYPE_BYTES[grad_dtype] + FP32) + c.grad_bytes  # grads, weights, averaged
        held = 0 if resident == n else c.block_params * FP32 + c.grad_bytes  # a paged shard kept until sent
        comm = shards_in_flight * (bucket + held)
    peak = c.base + c.phase_peak(working) + resident * per_resident + inflight * c.block_bytes + comm
    held = (sum(c.block_stored) - c.block_params) * FP32
    holds = clip and resident == n and replicas == 1 and peak + held <= budget
    if holds:
        peak += held
    heap_limit, heap_slack = STEP_MALLOC.mmap_bytes, 0
    if c.boundary_tensor >= heap_limit and resident == n and peak + HEAP_SLACK_TENSORS * c.boundary_tensor <= budget:
        # Under the default threshold every hidden-state tensor would be a fresh mmap that the kernel zeroes
        # page by page; with no paging and room to spare they come from the heap and are reused instead. So do
        # the loss chunk's logits, log-softmax and gradient (up to CHUNK_LOGIT_BYTES each, counted in the logits
        # working set): as fresh mmaps, llama3-8b r128's loss at 4 × 512 took 2.9–3.0 s a step, from the heap
        # 1.9–2.1 s. Freed after the loss, they serve the first blocks' backward.
        heap_limit = max(2 * c.boundary_tensor, 2 * CHUNK_LOGIT_BYTES if workload == "lm" else 0)
        heap_slack = HEAP_SLACK_TENSORS * c.boundary_tensor
        peak += heap_slack
    kept, kept_bytes = (resident, resident * c.kept_per_block) if keep else (0, 0)
    memos = memo_bytes = 0
    if profile.activations == "auto" and activations == "recompute" and resident == n:
        # Not every graph fits (auto would have chosen keep). Every block recomputes, so first each one's forward
        # leaves a memo for its recompute (in one arena, out of malloc's heap); then, where room remains, the last
        # blocks keep their whole graphs instead (a kept block needs no memo). Counted on top of the recompute
        # working set, though backward frees the graphs before it recomputes.
        # A block with nothing to record (additive attention, MLP not in slices) has no memo: per_memo is 0.
        room, per_memo = max(0, budget - peak), c.memo_per_block
        if room >= n * per_memo:
            per_graph = math.ceil(c.kept_per_block * (KEPT_GRAPH_HEAP_FACTOR if heap_slack else 1))
            kept = min(n, (room - n * per_memo) // max(1, per_graph - per_memo))
            kept_bytes = kept * per_graph
            memos = n - kept if per_memo else 0
        else:
            memos = room // per_memo
        memo_bytes = memos * per_memo
        peak += kept_bytes + memo_bytes

    paged = c.block_stored[resident:]
    store_bytes = (sum(c.block_stored) + c.embed_head_params) * c.resident_per_param
    # Forward reads a paged block's weights; backward reads weights and moments and writes both back.
    io_read = sum(p * (FP32 + c.resident_per_param) for p in paged)
    io_write = sum(p * c.resident_per_param for p in paged)
    if activations == "spill":
        # Each block's input goes to disk in forward and comes back for its backward.
        io_read += n * micro_batches * c.boundary_tensor
        io_write += n * micro_batches * c.boundary_tensor
    if profile.device == "cuda":
        notes.append("the plan counts host RAM; a CUDA device's own memory is not planned")
    if profile.compute_dtype == "bfloat16":
        notes.append("bfloat16 compute: activations are counted at float32 size (autocast keeps the residual "
                     "stream in float32)")

    return MemoryPlan(
        model=config.name,
        profile=profile.name,
        workload=workload,
        batch=batch,
        seq=seq,
        micro_batches=micro_batches,
        budget_bytes=budget,
        n_layers=n,
        compute_dtype=profile.compute_dtype,
        state_dtype=profile.state_dtype,
        activations=activations,
        activations_auto=profile.activations == "auto",
        block_params=c.block_params,
        block_weight_bytes=c.block_params * FP32,
        block_moment_bytes=c.block_bytes - c.block_params * FP32,
        block_grad_bytes=c.grad_bytes,
        embed_head_params=c.embed_head_params,
        embed_head_bytes=c.embed_head_bytes,
        resident_blocks=resident,
        prefetch_depth=prefetch,
        inflight_blocks=inflight,
        boundary_activation_bytes=c.boundary,
        boundary_grad_bytes=c.boundary_grad,
        kept_blocks=kept,
        kept_activation_bytes=kept_bytes,
        memo_blocks=memos,
        memo_bytes=memo_bytes,
        block_working_set_bytes=working,
        logits_bytes=c.logits,
        runtime_overhead_bytes=RUNTIME_OVERHEAD_BYTES,
        heap_tensor_limit=heap_limit,
        heap_slack_bytes=heap_slack,
        replicas=replicas,
        comm_buffer_bytes=comm,
        clip=clip,
        holds_gradients=holds,
        held_gradient_bytes=held if holds else 0,
        predicted_peak_bytes=peak,
        store_bytes=store_bytes,
        io_read_bytes_per_step=io_read,
        io_write_bytes_per_step=io_write,
        read_bytes_per_s=read_bytes_per_s,
        write_bytes_per_s=write_bytes_per_s,
        notes=notes,
    )
