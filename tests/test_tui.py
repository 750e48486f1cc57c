"""The TUI: the event reducer, the screen over a recorded real run, keys and buttons driving the trainer's
`Control`, watch mode over a growing events file, a live `tiny` training run steered with Pilot, and the
Steam Deck launcher installer.

`tests/data/tui_stream.jsonl` is a real run recorded by `tests/data/record_tui_stream.py`.
"""

from __future__ import annotations

import asyncio
import configparser
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from textual import events

from sct_edge.cli import main as cli_main
from sct_edge.errors import SctError
from sct_edge.events import (
    SCHEMA_VERSION,
    BlockEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    EventLog,
    MemoryEvent,
    PauseEvent,
    PhaseEvent,
    ResumeEvent,
    StartEvent,
    StepEvent,
    ThrottleEvent,
    UnknownEvent,
    event_to_dict,
    read_events,
)
from sct_edge.train.control import Control
from sct_edge.tui.app import SctEdgeApp
from sct_edge.tui.format import fmt_bytes, fmt_clock, fmt_duration
from sct_edge.tui.sources import FollowSource, LiveSource, ReplaySource
from sct_edge.tui.state import BLOCK_STATES, RunView, fold
from sct_edge.tui.widgets import EventsPanel, LayerMap, MemoryPanel, ProgressPanel, StatusPanel
from sct_edge.tui.widgets.progress_panel import phase_text

ROOT = Path(__file__).resolve().parents[1]
STREAM = Path(__file__).with_name("data") / "tui_stream.jsonl"
INSTALLER = ROOT / "tools" / "install-steamdeck-launcher"


@pytest.fixture(scope="module")
def recorded() -> list[Event]:
    return read_events(STREAM)


def kinds(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind]


async def wait_for(pilot, condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.05)


# ---------------------------------------------------------------------- the reducer


def test_fold_of_the_recorded_run(recorded):
    view = fold(recorded)
    steps = kinds(recorded, "step")
    start = recorded[0]
    assert view.preset == start.config["name"] == "tiny"
    assert view.n_blocks == start.n_blocks == len(view.blocks)
    assert view.step == view.total_steps == steps[-1].step
    assert view.losses == [e.loss for e in steps]
    assert view.min_loss == min(e.loss for e in steps)
    smoothed = steps[0].loss
    for e in steps[1:]:
        smoothed = 0.9 * smoothed + 0.1 * e.loss
    assert view.smoothed_loss == pytest.approx(smoothed)
    evals = kinds(recorded, "eval")
    assert view.val_losses == [e.val_loss for e in evals] and view.val_step == evals[-1].step
    assert view.last_commit_step == kinds(recorded, "commit")[-1].step
    assert view.ended and view.end_reason == "done" and view.paused_reason is None
    assert view.last_sample == kinds(recorded, "sample")[0].text
    last_step = steps[-1]
    assert (view.lr_spectral, view.ortho_err, view.eta_s) == (
        last_step.lr_spectral,
        last_step.ortho_err,
        last_step.eta_s,
    )
    texts = [line.text for line in view.log]
    assert any(t.startswith("paused by you") for t in texts) and "resumed" in texts
    assert sum(t.startswith("commit at step") for t in texts) == len(kinds(recorded, "commit"))
    # Log times are relative to the run's start, so a recording renders the same anywhere.
    assert view.log[0].elapsed_s == 0.0 and view.log[-1].elapsed_s == pytest.approx(
        recorded[-1].time - start.time
    )


def test_memory_follows_the_latest_reading_and_the_peak_never_drops(recorded):
    readings = [e for e in recorded if e.kind in ("memory", "step")]
    view = RunView()
    view.apply(recorded[0])
    for e in readings[:10]:
        view.apply(e)
    assert view.rss_bytes == readings[9].rss_bytes
    assert view.available_bytes == readings[9].available_bytes
    assert view.budget_bytes == recorded[0].budget_bytes
    peak = view.peak_rss_bytes
    view.apply(MemoryEvent(rss_bytes=1, peak_rss_bytes=1, available_bytes=2))
    assert view.rss_bytes == 1 and view.peak_rss_bytes == peak


def test_layer_map_is_the_last_state_of_each_block(recorded):
    # Fold up to the middle of a step of the recording and compare with the block events themselves.
    cut = [i for i, e in enumerate(recorded) if isinstance(e, BlockEvent) and e.state == "writing"][5] + 1
    view = fold(recorded[:cut])
    expected = ["disk"] * recorded[0].n_blocks
    for e in recorded[:cut]:
        if isinstance(e, BlockEvent):
            expected[e.block] = e.state
    assert view.blocks == expected
    assert "writing" in view.blocks and set(view.blocks) <= set(BLOCK_STATES)


def step_blocks(view: RunView, order: list[int]) -> list[tuple[str, int]]:
    seen = []
    for i in order:
        view.apply(BlockEvent(block=i, state="computing"))
        seen.append((view.phase, view.phase_block))
    return seen


def start_event(n_blocks: int, schema: int) -> StartEvent:
    return StartEvent(
        schema=schema, config={"name": "tiny"}, store="store", profile="ci", budget_bytes=2**30, batch=1, seq=16,
        micro_batches=1, workload="lm", total_steps=2, start_step=0, n_blocks=n_blocks, resident_blocks=0,
        prefetch_depth=0, predicted_peak_bytes=2**29, time=0.0,
    )


def step_event(step: int, loss: float) -> StepEvent:
    return StepEvent(
        step=step, total_steps=2, loss=loss, lr_spectral=0.01, lr_dense=0.003, tokens_per_s=100.0, step_s=0.5,
        phase_s={}, bytes_read=0, bytes_written=0, rss_bytes=1, peak_rss_bytes=1, available_bytes=1,
        budget_bytes=2**30, resident_blocks=0, ortho_err=0.0, grad_norm=None, battery=None, temperature_c=None,
        eta_s=0.5,
    )


def test_phase_within_a_step_from_the_order_blocks_compute_in():
    # A stream written before the step announced its phases (schema 1): the order blocks compute in tells them.
    view = fold([start_event(4, schema=1)])
    # Forward 0..3, a clipping pass 3..0 that only measures, the updating backward pass 3..0.
    seen = step_blocks(view, [0, 1, 2, 3, 3, 2, 1, 0, 3, 2, 1, 0])
    assert seen == [("forward", i) for i in range(4)] + [("backward", i) for i in (3, 2, 1, 0) * 2]
    # A block kept resident says nothing when its compute ends: the next compute moves it back to "resident".
    assert view.blocks == ["computing", "resident", "resident", "resident"]
    view.apply(step_event(1, 5.0))
    assert view.phase is None
    assert step_blocks(view, [0, 1]) == [("forward", 0), ("forward", 1)]
    # Trainer-announced phases keep their name while blocks compute under them.
    view.apply(PhaseEvent(phase="eval", step=1))
    assert step_blocks(view, [0, 1]) == [("eval", 0), ("eval", 1)]
    view.apply(EvalEvent(step=1, val_loss=4.0, val_ppl=54.6))
    assert view.phase is None and view.val_losses == [4.0]


def test_phase_within_a_step_from_the_phases_the_step_announces():
    view = fold([start_event(4, schema=2)])
    shown = []
    for event in (
        PhaseEvent(phase="forward", step=1, block=0),
        BlockEvent(block=0, state="computing"),
        BlockEvent(block=2, state="computing"),
        PhaseEvent(phase="backward", step=1, block=1),
        BlockEvent(block=1, state="computing"),
        PhaseEvent(phase="optimizer", step=1, block=1),
        PhaseEvent(phase="retraction", step=1, block=1),
        PhaseEvent(phase="spill", step=1, block=0),
        PhaseEvent(phase="backward", step=1, block=0),
    ):
        view.apply(event)
        shown.append((view.phase, view.phase_block))
    # The order blocks compute in no longer decides: a jump from block 0 to 2 stays forward, as announced.
    assert shown == [
        ("forward", 0), ("forward", 0), ("forward", 2), ("backward", 1), ("backward", 1), ("optimizer", 1),
        ("retraction", 1), ("spill", 0), ("backward", 0),
    ]
    view.apply(PhaseEvent(phase="spill", step=1, block=0))
    assert phase_text(view).plain == "activation spill · block 0 of 4"
    view.apply(step_event(1, 5.0))
    assert view.phase is None and view.phases_announced


def test_policy_events():
    view = RunView()
    view.apply(PauseEvent(reason="battery"))
    assert view.paused_reason == "battery" and view.log[-1].text == "paused on battery"
    view.apply(ResumeEvent(reason="battery"))
    assert view.paused_reason is None
    view.apply(ThrottleEvent(threads=1, reason="thermal"))
    assert (view.throttle_threads, view.throttle_reason) == (1, "thermal")
    view.apply(ThrottleEvent(threads=4, reason="cool"))
    assert view.throttle_threads is None
    view.apply(ErrorEvent(message="disk full"))
    view.apply(EndEvent(step=3, reason="error"))
    assert view.last_error == "disk full" and view.ended and view.log[-1].level == "error"
    view.apply(UnknownEvent(name="from-a-newer-writer", fields={}))
    assert view.events_seen == 7


def test_formatting():
    assert [fmt_bytes(n) for n in (None, 512, 41 * 1024, 412 * 2**20, 2**30, 1.5 * 2**40)] == [
        "–",
        "512 B",
        "41.0 KiB",
        "412 MiB",
        "1.00 GiB",
        "1.50 TiB",
    ]
    assert [fmt_duration(s) for s in (0.534, 42, 185, 7800, 3 * 86400 + 4 * 3600)] == [
        "0.53 s",
        "42 s",
        "3m 05s",
        "2h 10m",
        "3d 04h",
    ]
    assert [fmt_clock(s) for s in (5, 65, 3725)] == ["0:05", "1:05", "1:02:05"]


# ---------------------------------------------------------------------- the screen over a recording


def mid_step(recorded: list[Event]) -> list[Event]:
    """The recording up to the middle of a backward pass after the pause, commit and sample (as snapshots)."""
    after_sample = next(i for i, e in enumerate(recorded) if e.kind == "sample")
    cut = next(
        i
        for i, e in enumerate(recorded)
        if i > after_sample + 250 and isinstance(e, BlockEvent) and e.state == "writing"
    )
    return recorded[: cut + 2]


def test_panels_render_the_recorded_run(recorded):
    events = mid_step(recorded)
    expected = fold(events)

    async def scenario():
        app = SctEdgeApp(ReplaySource(events))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert app.view.step == expected.step and app.view.blocks == expected.blocks
            memory = app.query_one(MemoryPanel).render().plain
            assert "of budget" in memory and fmt_bytes(expected.rss_bytes) in memory
            cells = app.query_one(LayerMap).render().plain.splitlines()[0].split()
            assert [cell[1:] for cell in cells] == [str(i) for i in range(expected.n_blocks)]
            assert app.query_one(LayerMap).border_title == "Layers: 4 blocks, 0 kept in RAM"
            progress = app.query_one(ProgressPanel).render().plain
            assert f"step {expected.step} of {expected.total_steps}" in progress
            assert f"{expected.phase} · block {expected.phase_block} of 4" in progress
            assert "sample at step" in app.query_one(EventsPanel).render().plain
            assert "running" in app.query_one(StatusPanel).render().plain

    asyncio.run(scenario())


def test_progress_shows_mfu_next_to_tokens_per_second(recorded):
    """A step event with MFU (runs recorded before it carry none, and show none) puts it on the rate line."""
    events = mid_step(recorded)
    last = [e for e in events if isinstance(e, StepEvent)][-1]
    assert last.mfu is None
    events.append(dataclasses.replace(last, step=last.step + 1, mfu=0.437))

    async def scenario():
        app = SctEdgeApp(ReplaySource(events))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert app.view.mfu == 0.437
            rate = app.query_one(ProgressPanel).render().plain.splitlines()[2]
            assert "MFU 44%" in rate and "tok" in rate

    asyncio.run(scenario())


def test_keys_and_buttons_drive_the_control(recorded):
    async def scenario():
        app = SctEdgeApp(ReplaySource(mid_step(recorded)))
        control = app.control

        def footer_actions() -> set[str]:
            return {b.binding.action for b in app.active_bindings.values()}

        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert {"pause", "commit", "evaluate", "sample", "quit"} <= footer_actions()
            assert "resume" not in footer_actions()
            await pilot.press("p")
            assert control.paused and str(app.query_one("#pause").label) == "Resume p"
            assert "resume" in footer_actions() and "pause" not in footer_actions()
            assert app.query_one(StatusPanel).border_subtitle == "pause asked: pauses after this step"
            await pilot.press("p")
            assert not control.paused and "pause" in footer_actions()
            for key, flag in (
                ("c", control.commit_requested),
                ("e", control.eval_requested),
                ("s", control.sample_requested),
            ):
                await pilot.press(key)
                assert flag.is_set()
                flag.clear()
            for button, flag in (
                ("#commit", control.commit_requested),
                ("#evaluate", control.eval_requested),
                ("#sample", control.sample_requested),
            ):
                await pilot.click(button)
                assert flag.is_set()
            await pilot.click("#pause")
            assert control.paused
            await pilot.click("#quit")
            await wait_for(pilot, lambda: app.return_value is not None, "the app to exit")
            assert control.stop_requested.is_set()

    asyncio.run(scenario())


def test_a_stop_from_outside_closes_the_screen(recorded):
    # `sct-edge run` turns SIGINT/SIGTERM into control.stop(): once the run has stopped, the screen goes too.
    async def scenario():
        app = SctEdgeApp(ReplaySource(mid_step(recorded)))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            threading.Thread(target=app.control.stop).start()
            await wait_for(pilot, lambda: app.return_value is not None, "the app to exit", 10)
            assert app.producer_done and not app.stopping

    asyncio.run(scenario())


def test_read_only_screen_hides_steering(recorded):
    async def scenario():
        app = SctEdgeApp(ReplaySource(mid_step(recorded), interactive=False))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            actions = {b.binding.action for b in app.active_bindings.values()}
            assert "quit" in actions and not actions & {"pause", "resume", "commit", "evaluate", "sample"}
            assert not app.query_one("#commit").display and app.query_one("#read-only").display
            await pilot.press("p", "c")  # nothing to steer, nothing breaks
            await pilot.press("q")
            await wait_for(pilot, lambda: app.return_value is not None, "the app to exit")

    asyncio.run(scenario())


# ---------------------------------------------------------------------- watch mode


def test_watch_follows_a_growing_events_file(tmp_path, recorded):
    run_dir = tmp_path / "run"
    log = EventLog(run_dir / "events.jsonl")
    for e in recorded[:50]:
        log.emit(e)
    rest = recorded[50:400]

    def writer():
        for e in rest:
            log.emit(e)
        log.close()

    async def scenario():
        app = SctEdgeApp(FollowSource(run_dir))
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.view.events_seen >= 50, "the file's first events")
            thread = threading.Thread(target=writer)
            thread.start()
            await wait_for(pilot, lambda: app.view.events_seen == 400, "the events appended later", 30)
            thread.join()
            assert app.view.losses == [e.loss for e in kinds(recorded[:400], "step")]
            assert not app.query_one("#pause").display
            await pilot.press("q")
            await wait_for(pilot, lambda: app.return_value is not None, "the app to exit")

    asyncio.run(scenario())


def test_watch_needs_a_run_directory(tmp_path, capsys):
    with pytest.raises(SctError, match="not a run directory"):
        FollowSource(tmp_path / "missing")
    with pytest.raises(SctError, match="has no events.jsonl"):
        FollowSource(tmp_path)
    assert cli_main(["watch", str(tmp_path / "missing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_watch_refuses_a_stream_of_a_newer_schema(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    newer = json.dumps({**event_to_dict(start_event(4, schema=SCHEMA_VERSION + 1)), "renamed_field": 1})
    (run_dir / "events.jsonl").write_text(newer + "\n")
    assert cli_main(["watch", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{run_dir / 'events.jsonl'}:1: event schema version {SCHEMA_VERSION + 1} is newer" in err


# ---------------------------------------------------------------------- a live tiny run


def make_live_app(tmp_path: Path, steps: int, batch: int, seq: int) -> tuple[SctEdgeApp, Path]:
    from sct_edge.train.trainer import RunConfig, Trainer

    run = RunConfig(
        profile="ci",
        store=tmp_path / "store",
        preset="tiny",
        steps=steps,
        batch=batch,
        seq=seq,
        warmup=2,
        eval_every=0,
        eval_windows=2,
        commit_every=1000,
        # The README and the docs split out of it: enough text that 2 % held out covers a 256-token window.
        data=[str(ROOT / "README.md"), *map(str, sorted((ROOT / "docs").glob("*.md")))],
        run_dir=tmp_path / "run",
    )
    events_path = run.run_dir / "events.jsonl"
    control = Control()
    app = SctEdgeApp(LiveSource(lambda listeners: Trainer(run, EventLog(events_path, listeners), control), control))
    return app, events_path


def test_live_run_pause_resume_commit_quit(tmp_path):
    app, events_path = make_live_app(tmp_path, steps=10_000, batch=1, seq=16)
    view = app.view

    async def scenario():
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: view.step >= 1, "the first step")
            # A run of this version announces its phases: the screen shows them, it does not infer them.
            assert view.schema == SCHEMA_VERSION and view.phases_announced
            assert {"forward", "backward", "optimizer", "retraction"} <= set(view.phase_s)
            assert view.rss_bytes and "of budget" in app.query_one(MemoryPanel).render().plain
            assert len(app.query_one(LayerMap).render().plain.splitlines()[0].split()) == view.n_blocks == 4

            await pilot.press("p")
            await wait_for(pilot, lambda: view.paused_reason == "user", "the trainer to pause")
            paused_at = view.step
            await pilot.pause(1.5)
            # list(): one atomic copy, the trainer's memory monitor keeps appending while paused.
            assert view.step == paused_at and not any(isinstance(e, StepEvent) for e in list(app.source.inbox))
            await pilot.press("p")
            await wait_for(pilot, lambda: view.step >= paused_at + 2, "steps after resuming")

            await pilot.press("c")
            await wait_for(pilot, lambda: view.last_commit_step is not None, "the commit asked for")
            await pilot.press("e")
            await wait_for(pilot, lambda: view.val_losses, "the evaluation asked for")

            await pilot.press("q")
            assert "stopping" in app.query_one(StatusPanel).border_subtitle
            await wait_for(pilot, lambda: app.return_value is not None, "the trainer to commit and stop")

    asyncio.run(scenario())
    events = read_events(events_path)
    assert [e.reason for e in kinds(events, "pause")] == ["user"]
    commits, end = kinds(events, "commit"), events[-1]
    assert isinstance(end, EndEvent) and end.reason == "stopped" and app.return_value == 0
    # Quit committed the last step taken.
    assert len(commits) == 2 and commits[-1].step == end.step == kinds(events, "step")[-1].step
    assert app.producer_done and app.failure is None


def test_ui_answers_keys_during_a_long_step(tmp_path):
    # Batches big enough that a tiny step takes a second or more on a small CI machine.
    app, events_path = make_live_app(tmp_path, steps=10_000, batch=16, seq=256)
    view = app.view

    def key(name: str) -> None:
        # As the terminal driver sends it (Pilot.press also waits for the whole process to go idle, which a
        # training process never does).
        app.post_message(events.Key(name, name))

    async def scenario():
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: view.step >= 1, "the first step", timeout=120)
            for _attempt in range(5):
                await wait_for(pilot, lambda: view.phase == "backward" and not view.paused_reason, "a step running")
                step, polled = view.step, view.memory_at
                pressed = time.time()
                key("p")
                await wait_for(pilot, lambda: str(app.query_one("#pause").label) == "Resume p", "the key", 5)
                answered = time.time()
                assert answered - pressed < 1.0, f"the UI took {answered - pressed:.2f} s to answer a key"
                # Memory keeps refreshing at 1 Hz (the UI polls it itself; the trainer's monitor reports it too).
                await wait_for(pilot, lambda polled=polled: view.memory_at > polled, "a fresh memory reading", 3)
                await wait_for(pilot, lambda: view.paused_reason == "user", "the pause after that step")
                done = [e.time for e in kinds(read_events(events_path), "step") if e.step == step + 1]
                if answered < done[0]:
                    break  # the key was answered while that step was still running
                key("p")  # that step was too short to tell: resume and try on the next one
                await wait_for(pilot, lambda: view.paused_reason is None, "the resume")
            else:
                pytest.fail("no step lasted long enough to press a key during it")
            await pilot.press("q")
            await wait_for(pilot, lambda: app.return_value is not None, "the trainer to stop", timeout=120)

    asyncio.run(scenario())
    assert read_events(events_path)[-1].reason == "stopped"


def test_trainer_errors_are_shown_and_reraised(tmp_path):
    from sct_edge.train.trainer import RunConfig, Trainer

    # A store path that is a file: the trainer fails when it opens it, after the screen is up.
    (tmp_path / "store").write_text("not a store")
    run = RunConfig(profile="ci", store=tmp_path / "store", preset="tiny", steps=2, run_dir=tmp_path / "run")
    control = Control()
    app = SctEdgeApp(LiveSource(lambda listeners: Trainer(run, EventLog(None, listeners), control), control))

    async def scenario():
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.producer_done, "the trainer to fail")
            assert app.view.last_error and "error" in app.query_one(StatusPanel).render().plain
            assert app.query_one("#commit").disabled
            await pilot.press("q")
            await wait_for(pilot, lambda: app.return_value is not None, "the app to exit")

    asyncio.run(scenario())
    assert isinstance(app.failure, Exception) and app.return_value == 1


# ---------------------------------------------------------------------- the Steam Deck launcher


def installer(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_") and k != "VIRTUAL_ENV"}
    env["HOME"] = str(home)
    return subprocess.run([str(INSTALLER), *args], env=env, capture_output=True, text=True, timeout=60)


def test_launcher_installer_writes_a_valid_desktop_file(tmp_path):
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "sct-edge").is_file():
        pytest.skip(f"sct-edge is not installed in {venv}")
    result = installer(tmp_path, "--venv", str(venv), "--profile", "ci")
    assert result.returncode == 0, result.stderr
    written = [tmp_path / ".local/share/applications/sct-edge.desktop", tmp_path / "Desktop/sct-edge.desktop"]
    for path in written:
        assert os.access(path, os.X_OK)
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str
        parser.read(path)
        entry = parser["Desktop Entry"]
        assert entry["Type"] == "Application" and entry["Terminal"] == "false"
        exe = str((venv / "bin" / "sct-edge").resolve())
        assert entry["Exec"] == f'konsole --hold -e "{exe}" run --profile ci'
        assert Path(exe).is_absolute() and os.access(exe, os.X_OK)
        if shutil.which("desktop-file-validate"):
            check = subprocess.run(["desktop-file-validate", str(path)], capture_output=True, text=True)
            assert check.returncode == 0 and not check.stdout.strip(), check.stdout


def test_launcher_installer_refuses_a_venv_without_sct_edge(tmp_path):
    result = installer(tmp_path, "--venv", str(tmp_path))
    assert result.returncode == 2 and "is sct-edge installed in that venv?" in result.stderr
    assert not (tmp_path / "Desktop").exists()
    help_text = installer(tmp_path, "--help")
    assert help_text.returncode == 0 and "--venv PATH" in help_text.stdout
    assert installer(tmp_path, "--bogus").returncode == 2
