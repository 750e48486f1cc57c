"""Records `tui_stream.jsonl`, the TUI tests' event stream: a real `tiny` run, steered like a user would.

The `ci` profile with a 265 MiB budget pages every block (the layer map has something to show); a
listener plays the user: pause after step 12 (resumed a second later), commit now after step 15,
sample now after step 20. Run it from the repository root to re-record after the event schema changes:

    python tests/data/record_tui_stream.py

The checked-in recording was written before typed events (schema 1: no `schema` field, no forward/backward
phase events), and the tests use it to show that such runs still display; keep it when the schema moves on.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from sct_edge.events import Event, EventLog, StepEvent
from sct_edge.train.control import Control
from sct_edge.train.trainer import RunConfig, Trainer

OUT = Path(__file__).with_name("tui_stream.jsonl")


def record(out: Path = OUT) -> None:
    out.unlink(missing_ok=True)
    control = Control()

    def play_user(event: Event) -> None:
        if not isinstance(event, StepEvent):
            return
        if event.step == 12:
            control.pause()
            threading.Timer(1.0, control.resume).start()
        elif event.step == 15:
            control.commit_requested.set()
        elif event.step == 20:
            control.sample_requested.set()

    with tempfile.TemporaryDirectory() as tmp:
        run = RunConfig(
            profile="ci",
            budget="265MiB",
            store=Path(tmp) / "store",
            preset="tiny",
            steps=40,
            batch=4,
            seq=64,
            warmup=5,
            eval_every=10,
            commit_every=10,
            run_dir=Path(tmp) / "run",
        )
        events = EventLog(out, [play_user])
        try:
            Trainer(run, events, control).run()
        finally:
            events.close()


if __name__ == "__main__":
    record()
