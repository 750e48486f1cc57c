"""A training step's phase clock: wall time per phase, and the phases announced as the step enters them.

The step engine's phases are those of `sct_edge.events.STEP_PHASES` (forward, backward, optimizer,
retraction, spill) plus `io_wait`, the time compute spent blocked on the disk, and `other`. With an event
sink, entering a phase emits a `PhaseEvent` (with the block it runs on, None for the embedding and the head)
whenever the phase changes, which is what the TUI's phase line shows; evaluation and generation run without
one, under the phase the trainer announced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sct_edge.events import EventSink, PhaseEvent


@dataclass
class PhaseClock:
    """Seconds per phase of one step; `announce_to` (with the step's number) receives its phase changes."""

    announce_to: EventSink | None = None
    step: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    announced: str | None = None  # the phase last announced

    def add(self, phase: str, since: float) -> float:
        """Count the time from `since` to now as `phase`; returns now (the start of whatever comes next)."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now

    def enter(self, phase: str, block: int | None) -> None:
        """The step starts `phase` on `block`: announce it if the phase changed."""
        if self.announce_to is not None and phase != self.announced:
            self.announce_to(PhaseEvent(phase=phase, step=self.step, block=block))
            self.announced = phase
