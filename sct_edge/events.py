"""The run's event stream and the trainer's control seam.

A run directory holds `events.jsonl`: one JSON object per line, each with `"event"` (its kind) and `"time"`
(Unix seconds). The trainer writes it; the TUI, the plain progress output, `sct-edge watch` and
`memcalc --measured` read it. Kinds and their fields:

- `start`: `config` (ModelConfig dict), `store`, `profile`, `budget_bytes`, `batch`, `seq`, `micro_batches`,
  `workload`, `total_steps`, `start_step`, `n_blocks`, `resident_blocks`, `prefetch_depth`, `predicted_peak_bytes`.
- `step`: `step`, `total_steps`, `loss`, `lr_spectral`, `lr_dense`, `tokens_per_s`, `step_s`, `phase_s` (forward,
  backward, optimizer, retraction, io_wait, other), `bytes_read`, `bytes_written`, `rss_bytes`, `rss_anon_bytes`,
  `rss_file_bytes`, `peak_rss_bytes`, `available_bytes`, `budget_bytes`, `resident_blocks`, `ortho_err`,
  `grad_norm`, `battery` ({percent, plugged} or null), `temperature_c` (or null), `eta_s`.
- `block`: `block`, `state` (disk | loading | resident | computing | writing): the layer map, live.
- `phase`: `phase` (forward | backward | optimizer | commit | eval | sample), `step`.
- `eval`: `step`, `val_loss`, `val_ppl`.  `sample`: `step`, `text`.  `commit`: `step`, `seconds`.
- `pause` / `resume`: `reason` (user | battery | thermal).  `throttle`: `threads`, `reason`.
- `memory`: the `memory_snapshot()` fields, at least once a second while running.
- `error`: `message`.  `end`: `step`, `reason` (done | stopped | time_limit | error).
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil


class EventLog:
    """Appends events to `RUN_DIR/events.jsonl` (flushed per line) and forwards them to listeners."""

    def __init__(self, path: Path | None, listeners: list | None = None) -> None:
        self.path = path
        self.listeners = list(listeners or [])
        self._file = None
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def emit(self, event: dict) -> dict:
        event = {"event": event["event"], "time": time.time(), **{k: v for k, v in event.items() if k != "event"}}
        with self._lock:
            if self._file is not None:
                self._file.write(json.dumps(event) + "\n")
                self._file.flush()
        for listener in self.listeners:
            listener(event)
        return event

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: Path) -> list[dict]:
    """Every complete event in the file (a torn last line from a killed writer is skipped)."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                events.append(json.loads(line))
    return events


def follow(
    path: Path, stop: threading.Event | None = None, poll_s: float = 0.2, until_end: bool = True
) -> Iterator[dict]:
    """Yields events as another process appends them, until `stop` is set or (with `until_end`) an `end`
    event arrives. A resumed run appends a new session to the same file, so a viewer that should see it
    passes until_end=False and stops through `stop`."""
    while not path.exists():
        if stop is not None and stop.is_set():
            return
        time.sleep(poll_s)
    with open(path, encoding="utf-8") as f:
        pending = ""
        while stop is None or not stop.is_set():
            chunk = f.readline()
            if not chunk:
                time.sleep(poll_s)
                continue
            pending += chunk
            if not pending.endswith("\n"):
                continue
            event = json.loads(pending)
            pending = ""
            yield event
            if until_end and event["event"] == "end":
                return


class Control:
    """What a front end may ask of a running trainer; the trainer polls it between blocks and steps."""

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


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_snapshot() -> dict:
    """Resident memory of this process (anonymous vs file-backed where the OS says), its peak, and system available."""
    rss = psutil.Process().memory_info().rss
    peak = _status_kib("VmHWM")
    if peak is None:  # macOS reports ru_maxrss in bytes, Linux in KiB
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if os.uname().sysname == "Darwin" else maxrss * 1024
    return {
        "rss_bytes": rss,
        "rss_anon_bytes": _status_kib("RssAnon"),
        "rss_file_bytes": _status_kib("RssFile"),
        "peak_rss_bytes": max(peak, rss),
        "available_bytes": psutil.virtual_memory().available,
    }
