"""What the TUI shows, as plain data: `RunView`, folded from the run's event stream.

The reducer depends on nothing but the events (their `time` fields included: no clock, no I/O, no
widgets), so a live run, `sct-edge watch` and the snapshot tests' recorded stream all render through the
same code, and it can be tested without a screen. Widgets only read a `RunView`. Events arrive typed
(`sct_edge.events`); the phase within a step is the one the step announces, except in streams written before
it announced them (schema 1), where it is inferred from the order blocks compute in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sct_edge.events import (
    BLOCK_STATES,
    LEGACY_SCHEMA,
    STEP_PHASES,
    Battery,
    BlockEvent,
    CommitEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    MemoryEvent,
    PauseEvent,
    PhaseEvent,
    ResumeEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    ThrottleEvent,
)

LOG_LINES = 200  # older log lines are dropped; the full history stays in events.jsonl
SMOOTHING = 0.9  # exponential moving average weight of the smoothed loss

PAUSE_TEXT = {"user": "paused by you", "battery": "paused on battery", "thermal": "paused: too hot"}


@dataclass
class LogLine:
    """One line of the events panel: seconds since the run started, the text, and how loud to show it."""

    elapsed_s: float | None
    text: str
    level: str = "info"  # info | good | warning | error


@dataclass
class RunView:
    """Everything the screen shows about one run; `apply` folds one event in."""

    # The run, from `start`.
    preset: str | None = None
    profile: str | None = None
    store: str | None = None
    batch: int | None = None
    seq: int | None = None
    n_blocks: int = 0
    resident_blocks: int | None = None
    prefetch_depth: int | None = None
    predicted_peak_bytes: int | None = None
    activations: str | None = None
    started_at: float | None = None
    schema: int = LEGACY_SCHEMA
    rank: int = 0  # across replicas: this run's rank and how many there are
    world_size: int = 1
    # RAM: the latest `memory` or `step` reading.
    budget_bytes: int | None = None
    rss_bytes: int | None = None
    rss_anon_bytes: int | None = None
    rss_file_bytes: int | None = None
    peak_rss_bytes: int | None = None
    available_bytes: int | None = None
    memory_at: float | None = None  # `time` of the latest reading
    # The layer map: one state of BLOCK_STATES per block.
    blocks: list[str] = field(default_factory=list)
    # Progress.
    step: int = 0
    total_steps: int = 0
    start_step: int = 0
    phase: str | None = None  # one of STEP_PHASES or TRAINER_PHASES; None between steps
    phase_block: int | None = None  # the block being computed in that phase
    phases_announced: bool = False  # the writer announces the step's phases (else they are inferred)
    tokens_per_s: float | None = None
    mfu: float | None = None  # model FLOPs utilisation of the last step (writers before it: None)
    step_s: float | None = None
    phase_s: dict[str, float] = field(default_factory=dict)
    eta_s: float | None = None
    bytes_read: int | None = None
    bytes_written: int | None = None
    comm_s: float | None = None  # across replicas: the last step's exchange wait and bytes sent
    comm_bytes: int | None = None
    # Curves and numbers.
    losses: list[float] = field(default_factory=list)
    min_loss: float | None = None
    smoothed_loss: float | None = None
    val_losses: list[float] = field(default_factory=list)
    val_step: int | None = None
    val_ppl: float | None = None
    lr_spectral: float | None = None
    lr_dense: float | None = None
    ortho_err: float | None = None
    grad_norm: float | None = None
    # The edge policy.
    battery: Battery | None = None
    temperature_c: float | None = None
    paused_reason: str | None = None
    throttle_threads: int | None = None
    throttle_reason: str | None = None
    # Events and errors.
    log: deque[LogLine] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    logged: int = 0  # lines ever logged (the deque drops old ones)
    last_error: str | None = None
    last_commit_step: int | None = None
    last_sample: str | None = None
    ended: bool = False
    end_reason: str | None = None
    events_seen: int = 0

    def apply(self, event: Event) -> None:
        """Fold one event into the view (unknown kinds are counted and otherwise ignored: newer writers)."""
        self.events_seen += 1
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def elapsed(self, event: Event) -> float | None:
        if self.started_at is None:
            return None
        return event.time - self.started_at

    def _log(self, event: Event, text: str, level: str = "info") -> None:
        self.log.append(LogLine(self.elapsed(event), text, level))
        self.logged += 1

    # ------------------------------------------------------------------ handlers, one per event kind

    def _on_start(self, e: StartEvent) -> None:
        if self.started_at is None:
            self.started_at = e.time
        self.schema = e.schema
        self.preset = e.config.get("name")
        self.profile = e.profile
        self.store = e.store
        self.batch, self.seq = e.batch, e.seq
        self.n_blocks = e.n_blocks
        self.resident_blocks = e.resident_blocks
        self.prefetch_depth = e.prefetch_depth
        self.predicted_peak_bytes = e.predicted_peak_bytes
        self.activations = e.activations
        self.rank, self.world_size = e.rank, e.world_size
        self.budget_bytes = e.budget_bytes
        self.total_steps = e.total_steps
        self.start_step = self.step = e.start_step
        self.blocks = ["disk"] * self.n_blocks
        self.phase = self.phase_block = None
        self.phases_announced = False
        self.paused_reason = None
        self.ended, self.end_reason = False, None
        resumed = f", resumed at step {self.start_step}" if self.start_step else ""
        self._log(e, f"start: {self.preset or 'model'} on profile {self.profile}, {self.total_steps} steps{resumed}")

    def _on_memory(self, e: MemoryEvent | StepEvent) -> None:
        self.memory_at = e.time
        self.rss_bytes, self.available_bytes = e.rss_bytes, e.available_bytes
        if e.rss_anon_bytes is not None:
            self.rss_anon_bytes = e.rss_anon_bytes
        if e.rss_file_bytes is not None:
            self.rss_file_bytes = e.rss_file_bytes
        self.peak_rss_bytes = max(self.peak_rss_bytes or 0, e.peak_rss_bytes)

    def _on_block(self, e: BlockEvent) -> None:
        i, state = e.block, e.state
        if state not in BLOCK_STATES or i < 0:
            return
        if i >= len(self.blocks):
            self.blocks.extend(["disk"] * (i + 1 - len(self.blocks)))
            self.n_blocks = len(self.blocks)
        if state == "computing":
            # One block computes at a time; a block kept resident says nothing when its compute ends.
            self.blocks = ["resident" if s == "computing" else s for s in self.blocks]
            if self.phases_announced:
                self.phase_block = i
            else:
                self._infer_phase(i)
        self.blocks[i] = state

    def _infer_phase(self, i: int) -> None:
        """For streams whose step announced no phases (schema 1): tell forward from backward by the order blocks
        compute in. Forward climbs 0, 1, 2, ... one at a time; anything else (the turn at the top, a second
        backward pass for clipping) is backward until the step ends. Commit, eval and sample phases are
        announced by the trainer and keep their name."""
        if self.phase in (None, "forward"):
            if self.phase_block is None:
                climbing = i == 0
            else:
                climbing = self.phase == "forward" and i == self.phase_block + 1
            self.phase = "forward" if climbing else "backward"
        self.phase_block = i

    def _on_phase(self, e: PhaseEvent) -> None:
        if e.phase in STEP_PHASES:
            self.phases_announced = True
        self.phase = e.phase
        self.phase_block = e.block

    def _on_step(self, e: StepEvent) -> None:
        self.step = e.step
        self.total_steps = e.total_steps or self.total_steps
        self.losses.append(e.loss)
        self.min_loss = e.loss if self.min_loss is None else min(self.min_loss, e.loss)
        s = self.smoothed_loss
        self.smoothed_loss = e.loss if s is None else SMOOTHING * s + (1 - SMOOTHING) * e.loss
        self.tokens_per_s, self.step_s, self.eta_s = e.tokens_per_s, e.step_s, e.eta_s
        self.mfu = e.mfu
        self.bytes_read, self.bytes_written = e.bytes_read, e.bytes_written
        self.comm_s, self.comm_bytes = e.comm_s, e.comm_bytes
        self.lr_spectral, self.lr_dense = e.lr_spectral, e.lr_dense
        self.ortho_err, self.grad_norm = e.ortho_err, e.grad_norm
        self.battery, self.temperature_c = e.battery, e.temperature_c
        self.phase_s = dict(e.phase_s)
        self.budget_bytes = e.budget_bytes
        self._on_memory(e)
        self.phase = self.phase_block = None

    def _on_eval(self, e: EvalEvent) -> None:
        self.val_losses.append(e.val_loss)
        self.val_step, self.val_ppl = e.step, e.val_ppl
        self.phase = self.phase_block = None
        self._log(e, f"eval at step {e.step}: val loss {e.val_loss:.4f}, ppl {e.val_ppl:.2f}")

    def _on_sample(self, e: SampleEvent) -> None:
        self.last_sample = e.text
        self.phase = self.phase_block = None
        self._log(e, f"sample at step {e.step}: {self.last_sample}")

    def _on_commit(self, e: CommitEvent) -> None:
        self.last_commit_step = e.step
        self.phase = self.phase_block = None
        self._log(e, f"commit at step {e.step} ({e.seconds:.2f} s)", "good")

    def _on_pause(self, e: PauseEvent) -> None:
        self.paused_reason = e.reason
        self._log(e, PAUSE_TEXT.get(self.paused_reason, f"paused ({self.paused_reason})"), "warning")

    def _on_resume(self, e: ResumeEvent) -> None:
        self.paused_reason = None
        self._log(e, "resumed")

    def _on_throttle(self, e: ThrottleEvent) -> None:
        if e.reason == "cool":
            self.throttle_threads = self.throttle_reason = None
            self._log(e, f"cooled down: back to {e.threads} threads")
        else:
            self.throttle_threads, self.throttle_reason = e.threads, e.reason
            self._log(e, f"throttled to {e.threads} threads ({e.reason})", "warning")

    def _on_error(self, e: ErrorEvent) -> None:
        self.last_error = e.message
        self._log(e, f"error: {self.last_error}", "error")

    def _on_end(self, e: EndEvent) -> None:
        self.ended, self.end_reason = True, e.reason
        if e.step is not None:
            self.step = e.step
        self.phase = self.phase_block = None
        self.blocks = ["disk"] * len(self.blocks)
        level = "error" if self.end_reason == "error" else "good"
        self._log(e, f"end at step {self.step}: {self.end_reason}", level)


def fold(events: list[Event], view: RunView | None = None) -> RunView:
    """The view after `events`, folded into `view` (a fresh one by default)."""
    view = view if view is not None else RunView()
    for event in events:
        view.apply(event)
    return view
