"""What a front end may ask of a running trainer (pause, resume, stop, commit, evaluate, sample): flags the trainer
polls between blocks and steps. The answers come back as events (`sct_edge.events`)."""

from __future__ import annotations

import threading


class Control:
    """The trainer's control seam; any thread may set it, the trainer polls it."""

    def __init__(self) -> None:
        self._running = threading.Event()
        self._running.set()
        self.stop_requested = threading.Event()
        self.commit_requested = threading.Event()
        self.eval_requested = threading.Event()
        self.sample_requested = threading.Event()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self, timeout: float | None = None) -> bool:
        return self._running.wait(timeout)

    def stop(self) -> None:
        self.stop_requested.set()
        self._running.set()
