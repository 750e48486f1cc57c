"""Plain progress for runs without the TUI: a tqdm bar plus one line per evaluation, commit and event."""

from __future__ import annotations

from tqdm import tqdm

from sct_edge.events import (
    CommitEvent,
    EndEvent,
    EvalEvent,
    Event,
    PauseEvent,
    ResumeEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    ThrottleEvent,
)


class PlainProgress:
    """An event listener: the bar follows `step` events; other events print as lines above it."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, event: Event) -> None:
        match event:
            case StartEvent():
                self.bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step", dynamic_ncols=True)
                self._line(f"store {event.store} · profile {event.profile} · {event.n_blocks} blocks, "
                           f"{event.resident_blocks} resident · batch {event.batch}×{event.seq}")
                if event.defaults:
                    chosen = ", ".join(f"{k} {v:g}" for k, v in event.defaults.items() if k != "name")
                    self._line(f"{event.defaults['name']} defaults: {chosen} (flags override them)")
                for note in event.notes:
                    self._line(f"note: {note}")
            case StepEvent() if self.bar is not None:
                self.bar.update(event.step - self.bar.n)
                self.bar.set_postfix(loss=f"{event.loss:.3f}", tok_s=f"{event.tokens_per_s:.0f}",
                                     rss=f"{event.rss_bytes / 2**20:.0f}MiB")
            case EvalEvent():
                self._line(f"step {event.step}: validation loss {event.val_loss:.4f} (ppl {event.val_ppl:.2f})")
            case CommitEvent():
                self._line(f"step {event.step}: committed in {event.seconds:.2f} s")
            case PauseEvent() | ResumeEvent():
                self._line(f"{event.kind}d ({event.reason})")
            case ThrottleEvent():
                self._line(f"threads -> {event.threads} ({event.reason})")
            case SampleEvent():
                self._line(f"sample at step {event.step}:\n{event.text}")
            case EndEvent():
                self._line(f"run ended at step {event.step} ({event.reason})")

    def _line(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
