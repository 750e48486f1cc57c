"""Plain progress for runs without the TUI: a tqdm bar plus one line per evaluation, commit and event."""

from __future__ import annotations

from tqdm import tqdm


class PlainProgress:
    """An event listener: the bar follows `step` events; other events print as lines above it."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.bar = tqdm(total=event["total_steps"], initial=event["start_step"], unit="step", dynamic_ncols=True)
            self._line(f"store {event['store']} · profile {event['profile']} · {event['n_blocks']} blocks, "
                       f"{event['resident_blocks']} resident · batch {event['batch']}×{event['seq']}")
        elif kind == "step" and self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{event['loss']:.3f}", tok_s=f"{event['tokens_per_s']:.0f}",
                                 rss=f"{event['rss_bytes'] / 2**20:.0f}MiB")
        elif kind == "eval":
            self._line(f"step {event['step']}: validation loss {event['val_loss']:.4f} (ppl {event['val_ppl']:.2f})")
        elif kind == "commit":
            self._line(f"step {event['step']}: committed in {event['seconds']:.2f} s")
        elif kind in ("pause", "resume"):
            self._line(f"{kind}d ({event['reason']})")
        elif kind == "throttle":
            self._line(f"threads -> {event['threads']} ({event['reason']})")
        elif kind == "sample":
            self._line(f"sample at step {event['step']}:\n{event['text']}")
        elif kind == "end":
            self._line(f"run ended at step {event['step']} ({event['reason']})")

    def _line(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
