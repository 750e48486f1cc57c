"""The sct-edge TUI application and its two entry points: `run_tui` (a trainer behind the screen, for
`sct-edge run` on a terminal) and `watch_run` (another run's events file, for `sct-edge watch`).

Threads: the event source's producer (the trainer, or a file follower) runs in a Textual thread worker and
only appends to the source's inbox; a UI-thread timer drains the inbox into the `RunView` and redraws, so
neither side ever waits for the other. Keys and buttons only set flags on the trainer's `Control`.
"""

from __future__ import annotations

import threading
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.worker import Worker, WorkerState

from sct_edge.events import ErrorEvent, MemoryEvent, memory_snapshot
from sct_edge.train.control import Control
from sct_edge.tui.screens import RunScreen
from sct_edge.tui.sources import EventSource, FollowSource, LiveSource, MakeTrainer
from sct_edge.tui.state import RunView

DRAIN_S = 0.1  # how often queued events are folded in and the screen redrawn
MEMORY_S = 1.0  # how often a live run's memory is polled by the UI itself (also during a long step)
DRAIN_LIMIT = 20_000  # events per drain, so following a long history never freezes the keys
STEERING_ACTIONS = ("pause", "resume", "toggle_pause", "commit", "evaluate", "sample")


class SctEdgeApp(App[int]):
    """The run screen over an `EventSource`; the exit value is the producer's (the trainer's) status."""

    CSS_PATH = "sct_edge.tcss"
    TITLE = "sct-edge"
    ENABLE_COMMAND_PALETTE = False
    # Plain letters only: the Deck's on-screen keyboard and gamepad mappings make chords unreliable.
    # Both `p` bindings exist; check_action shows the one that applies.
    BINDINGS = [
        Binding("p", "pause", "Pause"),
        Binding("p", "resume", "Resume"),
        Binding("c", "commit", "Commit"),
        Binding("e", "evaluate", "Eval"),
        Binding("s", "sample", "Sample"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, source: EventSource) -> None:
        super().__init__()
        self.source = source
        self.control = source.control
        self.view = RunView()
        self.stop_event = threading.Event()  # ends a file follower; a trainer stops through its Control
        self.stopping = False
        self.producer_done = False
        self.failure: BaseException | None = None
        self.result_code = 0
        self.footer_state: tuple[bool, bool] | None = None
        self.run_screen = RunScreen(self.view, read_only=self.control is None)

    def get_default_screen(self) -> RunScreen:
        return self.run_screen

    def on_ready(self) -> None:
        # The screen is composed now: fold in what is already there (a recording: all of it), then go live.
        self.drain()
        self.redraw()
        self.set_interval(DRAIN_S, self.drain)
        if self.source.poll_memory:
            self.set_interval(MEMORY_S, self.poll_memory)
        self.produce()

    @work(thread=True, exit_on_error=False, name="producer", group="producer")
    def produce(self) -> int:
        return self.source.produce(self.stop_event)

    def on_unmount(self) -> None:
        # Leaving for any reason (a crash included) must not leave a trainer running unseen.
        if self.control is not None and not self.producer_done:
            self.control.stop()
        self.stop_event.set()

    # ------------------------------------------------------------------ events in, screen out

    def drain(self, limit: int | None = DRAIN_LIMIT) -> None:
        inbox, n = self.source.inbox, 0
        while inbox and (limit is None or n < limit):
            self.view.apply(inbox.popleft())
            n += 1
        if n:
            self.redraw()

    def poll_memory(self) -> None:
        self.view.apply(MemoryEvent(**memory_snapshot()))
        self.redraw()

    def redraw(self) -> None:
        view, control = self.view, self.control
        run = f"{view.preset} on profile {view.profile} · " if view.preset else ""
        self.sub_title = run + self.source.description
        steerable = control is not None and not (self.producer_done or self.stopping or view.ended)
        paused = control is not None and control.paused
        self.run_screen.show(view, self.note(), paused=paused, steerable=steerable)
        if (paused, steerable) != self.footer_state:
            self.footer_state = (paused, steerable)
            self.refresh_bindings()  # the footer recomposes: only when what it shows changes

    def note(self) -> str | None:
        """What was asked and not yet answered by the run's events."""
        control, view = self.control, self.view
        if control is None:
            return None  # read-only: the controls row says so
        if self.stopping:
            return "stopping: committing, then exit…"
        if self.producer_done or view.ended:
            return "the run is over: q exits"
        if control.paused and view.paused_reason != "user":
            return "pause asked: pauses after this step"
        if not control.paused and view.paused_reason == "user":
            return "resuming…"
        asked = [
            name
            for flag, name in (
                (control.commit_requested, "commit"),
                (control.eval_requested, "eval"),
                (control.sample_requested, "sample"),
            )
            if flag.is_set()
        ]
        return f"asked: {', '.join(asked)} after this step" if asked else None

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "producer" or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        self.producer_done = True
        self.drain(limit=None)
        if event.state == WorkerState.ERROR:
            self.failure = event.worker.error
            message = str(self.failure) or type(self.failure).__name__
            if self.view.last_error != message:  # the trainer reports its own SctErrors as events
                self.view.apply(ErrorEvent(message=message))
            self.result_code = 1
        else:
            self.result_code = event.worker.result or 0
        self.redraw()
        # Asked to stop, by q or by a signal handler of the command line: the run is committed, leave.
        if self.stopping or (self.control is not None and self.control.stop_requested.is_set()):
            self.exit(self.result_code)

    # ------------------------------------------------------------------ keys and buttons

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action not in STEERING_ACTIONS:
            return True
        if self.control is None:
            return False  # watch mode: hidden, the screen says why
        if action == "pause" and self.control.paused or action == "resume" and not self.control.paused:
            return False
        if self.producer_done or self.stopping or self.view.ended:
            return None  # shown, greyed out
        return True

    def action_pause(self) -> None:
        self.control.pause()
        self.redraw()

    def action_resume(self) -> None:
        self.control.resume()
        self.redraw()

    def action_toggle_pause(self) -> None:
        if self.control.paused:
            self.action_resume()
        else:
            self.action_pause()

    def action_commit(self) -> None:
        self.control.commit_requested.set()
        self.redraw()

    def action_evaluate(self) -> None:
        self.control.eval_requested.set()
        self.redraw()

    def action_sample(self) -> None:
        self.control.sample_requested.set()
        self.redraw()

    async def action_quit(self) -> None:
        """Quit: a running trainer is asked to stop (it commits first); the app exits when it has."""
        if self.producer_done or self.control is None:
            self.stop_event.set()
            self.exit(self.result_code)
            return
        if not self.stopping:
            self.stopping = True
            self.control.stop()
            self.redraw()


def run_tui(make_trainer: MakeTrainer, control: Control) -> int:
    """`sct-edge run` on a terminal: builds the trainer with `make_trainer(listeners)` (the listeners go to
    its EventLog; it must poll `control`, which the keys drive), runs it behind the screen and returns its
    exit status. A trainer error is re-raised after the screen closes, so the command line reports it."""
    app = SctEdgeApp(LiveSource(make_trainer, control))
    code = app.run()
    if app.failure is not None:
        raise app.failure
    if code is None:  # the screen itself failed (Textual printed why); the trainer was stopped and committed
        return app.return_code or 1
    return code


def watch_run(run_dir: Path) -> int:
    """`sct-edge watch RUN_DIR`: the same screen over another process's `RUN_DIR/events.jsonl`. A stream this
    version cannot read (a newer schema, a corrupt line) is re-raised after the screen closes."""
    app = SctEdgeApp(FollowSource(run_dir))
    app.run()
    if app.failure is not None:
        raise app.failure
    return 0
