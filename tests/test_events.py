"""The event schema: every kind survives a JSON round trip, a stream written before typed events still reads,
a newer schema and broken lines are refused with one line naming FILE:LINE, and the log's readers see what
its writer wrote."""

from __future__ import annotations

import json
import threading
from dataclasses import fields
from pathlib import Path

import pytest

from sct_edge.errors import SctError
from sct_edge.events import (
    EVENT_TYPES,
    LEGACY_SCHEMA,
    SCHEMA_VERSION,
    Battery,
    BlockEvent,
    CommitEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    EventLog,
    MemoryEvent,
    PauseEvent,
    PhaseEvent,
    ResumeEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    ThrottleEvent,
    UnknownEvent,
    event_to_dict,
    event_to_json,
    follow,
    memory_snapshot,
    parse_event,
    parse_line,
    read_events,
)

STREAM = Path(__file__).with_name("data") / "tui_stream.jsonl"


def one_of_each() -> list[Event]:
    start = StartEvent(
        config={"name": "tiny", "n_layers": 4}, store="/s", profile="ci", budget_bytes=2**30, batch=4, seq=64,
        micro_batches=2, workload="lm", total_steps=40, start_step=3, n_blocks=4, resident_blocks=1,
        prefetch_depth=2, activations="spill", predicted_peak_bytes=2**28, corpus="3 files", time=10.0,
    )
    step = StepEvent(
        step=4, total_steps=40, loss=5.25, lr_spectral=0.01, lr_dense=0.003, tokens_per_s=812.5, step_s=0.315,
        phase_s={"forward": 0.1, "backward": 0.2, "io_wait": 0}, bytes_read=123, bytes_written=456, rss_bytes=7,
        rss_anon_bytes=5, rss_file_bytes=2, peak_rss_bytes=8, available_bytes=9, budget_bytes=2**30, resident_blocks=1,
        ortho_err=1.3e-6, grad_norm=0.75, battery=Battery(percent=41.0, plugged=False), temperature_c=61.5, eta_s=12.0,
        time=11.0,
    )
    return [
        start,
        step,
        BlockEvent(block=2, state="writing", time=11.5),
        PhaseEvent(phase="retraction", step=4, block=2, time=11.6),
        PhaseEvent(phase="commit", step=4, time=11.7),
        EvalEvent(step=4, val_loss=5.5, val_ppl=244.7, time=12.0),
        SampleEvent(step=4, text="def f():\n\treturn 'é'", time=13.0),
        CommitEvent(step=4, seconds=0.25, time=14.0),
        PauseEvent(reason="battery", time=15.0),
        ResumeEvent(reason="battery", time=16.0),
        ThrottleEvent(threads=1, reason="thermal", time=17.0),
        MemoryEvent(rss_bytes=1, peak_rss_bytes=2, available_bytes=3, time=18.0),
        ErrorEvent(message="disk full", time=19.0),
        EndEvent(step=None, reason="error", time=20.0),
        UnknownEvent(name="from-a-newer-writer", fields={"x": [1, 2]}, time=21.0),
    ]


def test_every_kind_round_trips_through_one_json_line():
    events = one_of_each()
    assert {type(e) for e in events} == set(EVENT_TYPES.values()) | {UnknownEvent}
    for event in events:
        line = event_to_json(event)
        assert "\n" not in line
        record = json.loads(line)
        assert list(record)[:2] == ["event", "time"]
        if not isinstance(event, UnknownEvent):
            assert record["event"] == event.kind and set(record) == {"event"} | {f.name for f in fields(event)}
        assert parse_line(line, "here:1") == event


def test_the_start_event_carries_the_schema_version():
    start = one_of_each()[0]
    assert start.schema == SCHEMA_VERSION and event_to_dict(start)["schema"] == SCHEMA_VERSION


def test_a_stream_written_before_typed_events_reads_as_schema_1():
    events = read_events(STREAM)
    raw = [json.loads(line) for line in STREAM.read_text().splitlines()]
    assert len(events) == len(raw) and "schema" not in raw[0]
    assert isinstance(events[0], StartEvent) and events[0].schema == LEGACY_SCHEMA and events[0].activations is None
    # Every field the old writer wrote reads back unchanged; the new ones take their defaults.
    for event, record in zip(events, raw, strict=True):
        assert event.kind == record["event"]
        assert {k: v for k, v in event_to_dict(event).items() if k in record} == record
    assert {type(e) for e in events} >= {StartEvent, StepEvent, BlockEvent, PhaseEvent, MemoryEvent, EndEvent}


def test_a_newer_schema_is_refused_naming_the_version_and_the_file(tmp_path):
    path = tmp_path / "events.jsonl"
    newer = {**event_to_dict(one_of_each()[0]), "schema": SCHEMA_VERSION + 1, "config": "now a string"}
    path.write_text(json.dumps(newer) + "\n")
    with pytest.raises(SctError) as error:
        read_events(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:1: event schema version {SCHEMA_VERSION + 1} is newer than this sct-edge")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not a JSON line"),
        ("[1, 2]", 'not an event (a JSON object with an "event" name)'),
        ('{"event": "commit", "step": 1, "seconds": 0.5}', "commit event has no numeric time"),
        ('{"event": "commit", "time": 1.0, "step": 1}', "commit event lacks seconds"),
        ('{"event": "commit", "time": 1.0, "step": "1", "seconds": 0.5}', "commit event's step is '1', not int"),
        ('{"event": "block", "time": 1.0, "block": true, "state": "disk"}', "block event's block is True, not int"),
        ('{"event": "start", "time": 1.0, "schema": "2"}', "start event's schema '2' is not a version number"),
    ],
)
def test_broken_lines_are_refused_in_one_line_naming_file_and_line(line, message):
    with pytest.raises(SctError) as error:
        parse_line(line, "run/events.jsonl:7")
    assert str(error.value) == f"run/events.jsonl:7: {message}"


def test_fields_a_newer_writer_added_are_ignored_and_ints_are_floats():
    event = parse_event({"event": "commit", "time": 1, "step": 2, "seconds": 1, "mfu": 0.4}, "here")
    assert event == CommitEvent(step=2, seconds=1, time=1)


def test_the_log_writes_what_its_readers_read(tmp_path):
    path = tmp_path / "run" / "events.jsonl"
    heard: list[Event] = []
    log = EventLog(path, [heard.append])
    for event in one_of_each():
        log.emit(event)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"event": "memory", "time": 1')  # a writer killed mid-line
    assert heard == one_of_each() == read_events(path)
    stop = threading.Event()
    followed = []
    for event in follow(path, stop, poll_s=0.01, until_end=False):
        followed.append(event)
        if len(followed) == len(heard):
            stop.set()
    assert followed == heard
    assert list(follow(path, poll_s=0.01)) == heard[: heard.index(one_of_each()[13]) + 1]  # stops at the end event
    log.close()


def test_a_memory_snapshot_is_a_memory_event():
    event = MemoryEvent(**memory_snapshot())
    assert 0 < event.rss_bytes <= event.peak_rss_bytes and event.available_bytes > 0
    assert parse_line(event_to_json(event), "here") == event
