"""Where the screen's events come from: a trainer running in this process, another run's events file, or a
recorded list.

Producers run on their own threads and only append to the source's `inbox` (a deque: appends and pops are
atomic), so a producer never waits on the UI; the app drains the inbox on the UI thread several times a
second and is the only one to touch widgets.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from sct_edge.errors import SctError
from sct_edge.events import Event, EventSink, first_event, follow
from sct_edge.train.control import Control


class Trainer(Protocol):
    def run(self) -> int: ...


MakeTrainer = Callable[[list[EventSink]], Trainer]


class EventSource:
    """Base: an inbox of events, the `Control` the keys drive (None when the run is not ours to steer),
    whether the app should poll this process's memory itself, and a one-line description for the header."""

    control: Control | None = None
    poll_memory: bool = False
    description: str = ""

    def __init__(self) -> None:
        self.inbox: deque[Event] = deque()

    def produce(self, stop: threading.Event) -> int:
        """Runs on a worker thread until the stream ends (or `stop` is set); returns the exit status."""
        raise NotImplementedError


class LiveSource(EventSource):
    """A trainer in this process, steered through `control` (the one it polls). It is built at once (so bad
    settings fail before the screen opens) and run on a worker thread by the app; its EventLog calls
    `inbox.append` from the trainer's threads."""

    poll_memory = True

    def __init__(self, make_trainer: MakeTrainer, control: Control, description: str = "live run") -> None:
        super().__init__()
        self.control = control
        self.description = description
        self.trainer = make_trainer([self.inbox.append])

    def produce(self, stop: threading.Event) -> int:
        # `stop` is for sources that can simply be abandoned; a trainer stops through `control` and commits.
        return self.trainer.run()


class FollowSource(EventSource):
    """Another process's run: `RUN_DIR/events.jsonl`, from its beginning, then as it grows (read-only)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise SctError(f"watch: {run_dir} is not a run directory")
        self.path = run_dir / "events.jsonl"
        if not self.path.is_file():
            raise SctError(f"watch: {run_dir} has no events.jsonl (is it the run directory of `sct-edge run`?)")
        first_event(self.path)  # a stream of a newer schema is refused before the screen opens
        self.description = f"watching {run_dir}"

    def produce(self, stop: threading.Event) -> int:
        for event in follow(self.path, stop, until_end=False):
            self.inbox.append(event)
        return 0


class ReplaySource(EventSource):
    """A recorded list, all in the inbox before the screen first draws: deterministic (snapshot tests,
    screenshots). With `interactive`, the keys drive a `Control` of their own, as on a live run."""

    def __init__(self, events: list[Event], interactive: bool = True, description: str = "recorded run") -> None:
        super().__init__()
        self.inbox.extend(events)
        self.control = Control() if interactive else None
        self.description = description

    def produce(self, stop: threading.Event) -> int:
        # A recording has no end of its own: like a run in progress it lasts until the user quits.
        (self.control.stop_requested if self.control is not None else stop).wait()
        return 0
