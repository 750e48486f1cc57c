"""What the TUI shows, as plain data: `RunView`, folded from the run's event stream.

The reducer depends on nothing but the events (their `time` fields included: no clock, no I/O, no
widgets), so a live run, `sct-edge watch` and the snapshot tests' recorded stream all render through the
same code, and it can be tested without a screen. Widgets only read a `RunView`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

BLOCK_STATES = ("disk", "loading", "resident", "computing", "writing")
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
    started_at: float | None = None
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
    phase: str | None = None  # forward | backward | optimizer | commit | eval | sample; None between steps
    phase_block: int | None = None  # the block being computed in that phase
    tokens_per_s: float | None = None
    step_s: float | None = None
    phase_s: dict[str, float] = field(default_factory=dict)
    eta_s: float | None = None
    bytes_read: int | None = None
    bytes_written: int | None = None
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
    battery: dict | None = None
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

    def apply(self, event: dict) -> None:
        """Fold one event into the view (unknown kinds are counted and otherwise ignored: newer writers)."""
        self.events_seen += 1
        handler = getattr(self, f"_on_{event.get('event')}", None)
        if handler is not None:
            handler(event)

    def elapsed(self, event: dict) -> float | None:
        if self.started_at is None or "time" not in event:
            return None
        return event["time"] - self.started_at

    def _log(self, event: dict, text: str, level: str = "info") -> None:
        self.log.append(LogLine(self.elapsed(event), text, level))
        self.logged += 1

    # ------------------------------------------------------------------ handlers, one per event kind

    def _on_start(self, e: dict) -> None:
        config = e.get("config") or {}
        if self.started_at is None:
            self.started_at = e.get("time")
        self.preset = config.get("name")
        self.profile = e.get("profile")
        self.store = e.get("store")
        self.batch, self.seq = e.get("batch"), e.get("seq")
        self.n_blocks = int(e.get("n_blocks") or config.get("n_layers") or 0)
        self.resident_blocks = e.get("resident_blocks")
        self.prefetch_depth = e.get("prefetch_depth")
        self.predicted_peak_bytes = e.get("predicted_peak_bytes")
        self.budget_bytes = e.get("budget_bytes", self.budget_bytes)
        self.total_steps = e.get("total_steps") or 0
        self.start_step = self.step = e.get("start_step") or 0
        self.blocks = ["disk"] * self.n_blocks
        self.phase = self.phase_block = None
        self.paused_reason = None
        self.ended, self.end_reason = False, None
        resumed = f", resumed at step {self.start_step}" if self.start_step else ""
        self._log(e, f"start: {self.preset or 'model'} on profile {self.profile}, {self.total_steps} steps{resumed}")

    def _on_memory(self, e: dict) -> None:
        self.memory_at = e.get("time", self.memory_at)
        for key in ("rss_bytes", "rss_anon_bytes", "rss_file_bytes", "available_bytes"):
            if e.get(key) is not None:
                setattr(self, key, e[key])
        if e.get("peak_rss_bytes") is not None:
            self.peak_rss_bytes = max(self.peak_rss_bytes or 0, e["peak_rss_bytes"])
        if e.get("budget_bytes") is not None:
            self.budget_bytes = e["budget_bytes"]

    def _on_block(self, e: dict) -> None:
        i, state = e.get("block"), e.get("state")
        if not isinstance(i, int) or state not in BLOCK_STATES:
            return
        if i >= len(self.blocks):
            self.blocks.extend(["disk"] * (i + 1 - len(self.blocks)))
            self.n_blocks = len(self.blocks)
        if state == "computing":
            # One block computes at a time; a block kept resident says nothing when its compute ends.
            self.blocks = ["resident" if s == "computing" else s for s in self.blocks]
            self._advance_phase(i)
        self.blocks[i] = state

    def _advance_phase(self, i: int) -> None:
        """Tell forward from backward by the order blocks compute in: forward climbs 0, 1, 2, ... one at a
        time; anything else (the turn at the top, a second backward pass for clipping) is backward until
        the step ends. Commit, eval and sample phases are announced by the trainer and keep their name."""
        if self.phase in (None, "forward"):
            if self.phase_block is None:
                climbing = i == 0
            else:
                climbing = self.phase == "forward" and i == self.phase_block + 1
            self.phase = "forward" if climbing else "backward"
        self.phase_block = i

    def _on_phase(self, e: dict) -> None:
        self.phase = e.get("phase")
        self.phase_block = None

    def _on_step(self, e: dict) -> None:
        self.step = e.get("step", self.step)
        self.total_steps = e.get("total_steps") or self.total_steps
        loss = e.get("loss")
        if loss is not None:
            self.losses.append(loss)
            self.min_loss = loss if self.min_loss is None else min(self.min_loss, loss)
            s = self.smoothed_loss
            self.smoothed_loss = loss if s is None else SMOOTHING * s + (1 - SMOOTHING) * loss
        for key in (
            "tokens_per_s",
            "step_s",
            "eta_s",
            "bytes_read",
            "bytes_written",
            "lr_spectral",
            "lr_dense",
            "ortho_err",
            "grad_norm",
            "battery",
            "temperature_c",
        ):
            if key in e:
                setattr(self, key, e[key])
        self.phase_s = dict(e.get("phase_s") or {})
        self._on_memory(e)
        self.phase = self.phase_block = None

    def _on_eval(self, e: dict) -> None:
        self.val_losses.append(e["val_loss"])
        self.val_step, self.val_ppl = e.get("step"), e.get("val_ppl")
        self.phase = self.phase_block = None
        self._log(e, f"eval at step {e.get('step')}: val loss {e['val_loss']:.4f}, ppl {e.get('val_ppl', 0):.2f}")

    def _on_sample(self, e: dict) -> None:
        self.last_sample = e.get("text", "")
        self.phase = self.phase_block = None
        self._log(e, f"sample at step {e.get('step')}: {self.last_sample}")

    def _on_commit(self, e: dict) -> None:
        self.last_commit_step = e.get("step")
        self.phase = self.phase_block = None
        self._log(e, f"commit at step {e.get('step')} ({e.get('seconds', 0):.2f} s)", "good")

    def _on_pause(self, e: dict) -> None:
        self.paused_reason = e.get("reason") or "user"
        self._log(e, PAUSE_TEXT.get(self.paused_reason, f"paused ({self.paused_reason})"), "warning")

    def _on_resume(self, e: dict) -> None:
        self.paused_reason = None
        self._log(e, "resumed")

    def _on_throttle(self, e: dict) -> None:
        reason = e.get("reason")
        if reason == "cool":
            self.throttle_threads = self.throttle_reason = None
            self._log(e, f"cooled down: back to {e.get('threads')} threads")
        else:
            self.throttle_threads, self.throttle_reason = e.get("threads"), reason
            self._log(e, f"throttled to {e.get('threads')} threads ({reason})", "warning")

    def _on_error(self, e: dict) -> None:
        self.last_error = e.get("message", "")
        self._log(e, f"error: {self.last_error}", "error")

    def _on_end(self, e: dict) -> None:
        self.ended, self.end_reason = True, e.get("reason")
        if e.get("step") is not None:
            self.step = e["step"]
        self.phase = self.phase_block = None
        self.blocks = ["disk"] * len(self.blocks)
        level = "error" if self.end_reason == "error" else "good"
        self._log(e, f"end at step {self.step}: {self.end_reason}", level)


def fold(events: list[dict], view: RunView | None = None) -> RunView:
    """The view after `events`, folded into `view` (a fresh one by default)."""
    view = view if view is not None else RunView()
    for event in events:
        view.apply(event)
    return view
