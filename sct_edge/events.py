"""The run's event stream: one typed dataclass per kind of event, one serialiser, one parser, the log and its readers.

A run directory holds `events.jsonl`: one JSON object per line, `{"event": KIND, "time": UNIX_SECONDS, ...fields}`.
The trainer, its memory monitor and edge policy, and the step engine (block states and the phases it runs) emit
these types; the TUI, plain progress, `sct-edge watch` and `memcalc --measured` read them back through `parse_event`,
so a field exists in one place: its dataclass here. The module sits at the package top, not under `train/`,
because the engine emits block and phase events and must not depend on the trainer.

Versions: the `start` event of each session carries `schema`. Adding a kind or an optional field keeps the
version (readers ignore fields they do not know and keep unknown kinds as `UnknownEvent`); renaming, removing
or changing the meaning of a field bumps `SCHEMA_VERSION`, and a reader refuses a stream newer than itself with
a one-line error naming the version and the file. Streams written before typed events have no `schema`: they
read as version 1, whose only difference is that the step announced no forward/backward phases.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import threading
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from time import sleep
from time import time as unix_time
from typing import ClassVar

from sct_edge.errors import SctError

SCHEMA_VERSION = 2
LEGACY_SCHEMA = 1  # streams written before typed events: a start event without `schema`
BLOCK_STATES = ("disk", "loading", "resident", "computing", "writing")
# What the step engine runs (announced as it enters each) and what the trainer does between steps.
STEP_PHASES = ("forward", "backward", "optimizer", "retraction", "spill")
TRAINER_PHASES = ("commit", "eval", "sample")


@dataclass(kw_only=True)
class Event:
    """Base of every event: its kind (a class constant, the JSON `event` field) and when it happened."""

    kind: ClassVar[str] = ""
    time: float = field(default_factory=unix_time)


@dataclass(kw_only=True)
class MemoryReading:
    """Resident memory of the process (anonymous and file-backed where the OS says), its peak, system available."""

    rss_bytes: int
    rss_anon_bytes: int | None = None
    rss_file_bytes: int | None = None
    peak_rss_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Battery:
    """A battery reading as the edge policy sees it."""

    percent: float
    plugged: bool


@dataclass(kw_only=True)
class StartEvent(Event):
    """A run session begins (a resumed run appends a new session to the same file)."""

    kind: ClassVar[str] = "start"
    schema: int = SCHEMA_VERSION
    config: dict  # ModelConfig.to_dict()
    store: str
    profile: str
    budget_bytes: int
    batch: int
    seq: int
    micro_batches: int
    workload: str  # lm | hidden-sum (written "seed" before that rename)
    total_steps: int
    start_step: int
    n_blocks: int
    resident_blocks: int
    prefetch_depth: int
    activations: str | None = None  # the plan's choice: recompute | keep | spill (absent before schema 2)
    clip: float | None = None  # the global gradient-norm clip (None: no clipping, or a run from before it was kept)
    predicted_peak_bytes: int
    corpus: str | None = None  # what the run trains on, in words
    data: dict | None = None  # what the run trains on, in numbers (text tokens, or JSONL examples and masking)
    defaults: dict | None = None  # the schedule defaults filled in ({"name": "fine-tuning", "lr_spectral": ...})
    notes: list[str] = field(default_factory=list)  # how the run degraded instead of failing (short validation)
    rank: int = 0  # across replicas (torchrun): this process's global rank
    world_size: int = 1  # across replicas: how many ranks train the model


@dataclass(kw_only=True)
class StepEvent(Event, MemoryReading):
    """An optimizer step completed; the memory fields are read right after it."""

    kind: ClassVar[str] = "step"
    step: int
    total_steps: int
    loss: float
    lr_spectral: float
    lr_dense: float
    tokens_per_s: float
    step_s: float
    phase_s: dict[str, float]  # seconds per phase: forward, backward, optimizer, retraction, spill, io_wait, other
    bytes_read: int
    bytes_written: int
    budget_bytes: int
    resident_blocks: int
    ortho_err: float
    grad_norm: float | None
    battery: Battery | None
    temperature_c: float | None
    eta_s: float
    comm_s: float = 0.0  # across replicas: seconds the step waited for the gradient exchange
    comm_bytes: int = 0  # across replicas: payload bytes this rank sent in the step
    mfu: float | None = None  # model FLOPs a second over the GEMM peak (compute dtype) measured at the run's start


@dataclass(kw_only=True)
class BlockEvent(Event):
    """A block of the layer map changed state (one of BLOCK_STATES)."""

    kind: ClassVar[str] = "block"
    block: int
    state: str


@dataclass(kw_only=True)
class PhaseEvent(Event):
    """The run entered a phase: one the step runs (STEP_PHASES, with the block it runs on where there is one)
    or one the trainer runs between steps (TRAINER_PHASES)."""

    kind: ClassVar[str] = "phase"
    phase: str
    step: int | None = None
    block: int | None = None


@dataclass(kw_only=True)
class EvalEvent(Event):
    kind: ClassVar[str] = "eval"
    step: int
    val_loss: float
    val_ppl: float


@dataclass(kw_only=True)
class SampleEvent(Event):
    kind: ClassVar[str] = "sample"
    step: int
    text: str


@dataclass(kw_only=True)
class CommitEvent(Event):
    kind: ClassVar[str] = "commit"
    step: int
    seconds: float


@dataclass(kw_only=True)
class PauseEvent(Event):
    kind: ClassVar[str] = "pause"
    reason: str  # user | battery | thermal


@dataclass(kw_only=True)
class ResumeEvent(Event):
    kind: ClassVar[str] = "resume"
    reason: str  # what the pause was for


@dataclass(kw_only=True)
class ThrottleEvent(Event):
    kind: ClassVar[str] = "throttle"
    threads: int
    reason: str  # thermal (throttled) | cool (back to the full count)


@dataclass(kw_only=True)
class MemoryEvent(Event, MemoryReading):
    """A memory reading taken between steps (at least once a second while running)."""

    kind: ClassVar[str] = "memory"


@dataclass(kw_only=True)
class ErrorEvent(Event):
    kind: ClassVar[str] = "error"
    message: str


@dataclass(kw_only=True)
class EndEvent(Event):
    kind: ClassVar[str] = "end"
    step: int | None  # None when the run failed before its store was open
    reason: str  # done | stopped | time_limit | error


@dataclass(kw_only=True)
class UnknownEvent(Event):
    """A kind this version does not know (a newer writer added it): kept so readers can count and skip it."""

    kind: ClassVar[str] = "unknown"
    name: str
    fields: dict


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (StartEvent, StepEvent, BlockEvent, PhaseEvent, EvalEvent, SampleEvent, CommitEvent, PauseEvent,
                ResumeEvent, ThrottleEvent, MemoryEvent, ErrorEvent, EndEvent)
}

EventSink = Callable[[Event], None]


# ---------------------------------------------------------------- serialiser and parser


def event_to_dict(event: Event) -> dict:
    """The JSON object of an event: `event` and `time` first, then its fields in declaration order."""
    if isinstance(event, UnknownEvent):
        return {"event": event.name, "time": event.time, **event.fields}
    record = asdict(event)
    return {"event": event.kind, "time": record.pop("time"), **record}


def event_to_json(event: Event) -> str:
    """One line of events.jsonl (without its newline)."""
    return json.dumps(event_to_dict(event))


def _matches(value: object, annotation: object) -> bool:
    """Whether a decoded JSON value fits a field's annotation (an int is a float; a bool is not a number)."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is Battery:
        return isinstance(value, dict) and set(value) == {"percent", "plugged"}
    if origin is dict:
        _, value_type = typing.get_args(annotation)
        return isinstance(value, dict) and all(_matches(v, value_type) for v in value.values())
    return isinstance(value, origin or annotation)


def _type_name(annotation: object) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)


@functools.cache
def _fields_of(cls: type[Event]) -> tuple[dict[str, object], tuple[str, ...]]:
    """A kind's field annotations and the fields without a default (resolved once: parsing is per line)."""
    hints = typing.get_type_hints(cls)
    hints = {f.name: hints[f.name] for f in fields(cls)}
    required = tuple(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)
    return hints, required


def parse_event(record: object, where: str) -> Event:
    """The typed event of one decoded JSON line; `where` (FILE:LINE) prefixes the one-line error of a bad one.

    A start event without `schema` is a pre-typed stream's (version 1); one newer than SCHEMA_VERSION is refused.
    """
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        raise SctError(f'{where}: not an event (a JSON object with an "event" name)')
    kind = record["event"]
    stamp = record.get("time")
    if not _matches(stamp, float):
        raise SctError(f"{where}: {kind} event has no numeric time")
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        rest = {k: v for k, v in record.items() if k not in ("event", "time")}
        return UnknownEvent(time=stamp, name=kind, fields=rest)
    values = {k: v for k, v in record.items() if k != "event"}
    if cls is StartEvent:
        schema = values.setdefault("schema", LEGACY_SCHEMA)
        if not _matches(schema, int):
            raise SctError(f"{where}: start event's schema {schema!r} is not a version number")
        if schema > SCHEMA_VERSION:
            raise SctError(f"{where}: event schema version {schema} is newer than this sct-edge reads "
                           f"(up to {SCHEMA_VERSION}); upgrade sct-edge to read this run")
    hints, required = _fields_of(cls)
    given = {k: v for k, v in values.items() if k in hints}  # fields a newer writer added are ignored
    missing = [name for name in required if name not in given]
    if missing:
        raise SctError(f"{where}: {kind} event lacks {', '.join(missing)}")
    for name, value in given.items():
        if not _matches(value, hints[name]):
            raise SctError(f"{where}: {kind} event's {name} is {value!r}, not {_type_name(hints[name])}")
    if isinstance(given.get("battery"), dict):
        given["battery"] = Battery(**given["battery"])
    return cls(**given)


# ---------------------------------------------------------------- the log and its readers


class EventLog:
    """Appends events to `RUN_DIR/events.jsonl` (flushed per line) and forwards them to listeners."""

    def __init__(self, path: Path | None, listeners: list[EventSink] | None = None) -> None:
        self.path = path
        self.listeners = list(listeners or [])
        self._file = None
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def emit(self, event: Event) -> Event:
        line = event_to_json(event) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
        for listener in self.listeners:
            listener(event)
        return event

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def parse_line(line: str, where: str) -> Event:
    """The typed event of one line of events.jsonl."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise SctError(f"{where}: not a JSON line") from None
    return parse_event(record, where)


def read_events(path: Path) -> list[Event]:
    """Every complete event in the file, typed (a torn last line from a killed writer is skipped)."""
    events = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.endswith("\n") and line.strip():
                    events.append(parse_line(line, f"{path}:{number}"))
    except (OSError, UnicodeDecodeError) as error:
        raise SctError(f"{path}: cannot read it ({error})") from None
    return events


def first_event(path: Path) -> Event | None:
    """The file's first complete event (its first session's start), to refuse a stream of a newer schema at once."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError) as error:
        raise SctError(f"{path}: cannot read it ({error})") from None
    return parse_line(line, f"{path}:1") if line.endswith("\n") else None


def follow(
    path: Path, stop: threading.Event | None = None, poll_s: float = 0.2, until_end: bool = True
) -> Iterator[Event]:
    """Yields typed events as another process appends them, until `stop` is set or (with `until_end`) an `end`
    event arrives. A resumed run appends a new session to the same file, so a viewer that should see it
    passes until_end=False and stops through `stop`."""
    while not path.exists():
        if stop is not None and stop.is_set():
            return
        sleep(poll_s)
    with open(path, encoding="utf-8") as f:
        pending, number = "", 0
        while stop is None or not stop.is_set():
            chunk = f.readline()
            if not chunk:
                sleep(poll_s)
                continue
            pending += chunk
            if not pending.endswith("\n"):
                continue
            number += 1
            line, pending = pending, ""
            if not line.strip():
                continue
            event = parse_line(line, f"{path}:{number}")
            yield event
            if until_end and isinstance(event, EndEvent):
                return


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_snapshot() -> dict:
    """A `MemoryReading`'s fields for this process now: resident memory (anonymous vs file-backed where the OS
    says), its peak, and system available."""
    # Imported here: parsing events needs the standard library alone (tools/memcalc runs without site-packages).
    import psutil

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
