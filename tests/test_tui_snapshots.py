"""Snapshots of the run screen (pytest-textual-snapshot), from the recorded real run in tests/data.

Deterministic: the recording is folded in before the first frame, times are shown relative to the run's
start, and a replay polls no live memory. Refresh after an intended change of the screen with
`pytest tests/test_tui_snapshots.py --snapshot-update` and look at the SVGs in tests/__snapshots__/.
"""

from __future__ import annotations

import pytest
from test_tui import STREAM, mid_step

from sct_edge.events import Event, read_events
from sct_edge.tui.app import SctEdgeApp
from sct_edge.tui.sources import ReplaySource


@pytest.fixture(scope="module")
def mid_run() -> list[Event]:
    return mid_step(read_events(STREAM))


def test_run_screen_80x24(snap_compare, mid_run):
    assert snap_compare(SctEdgeApp(ReplaySource(mid_run)), terminal_size=(80, 24))


def test_run_screen_160x50(snap_compare, mid_run):
    assert snap_compare(SctEdgeApp(ReplaySource(mid_run)), terminal_size=(160, 50))


def test_run_screen_paused_asked_100x30(snap_compare, mid_run):
    assert snap_compare(SctEdgeApp(ReplaySource(mid_run)), press=["p"], terminal_size=(100, 30))


def test_watch_screen_80x24(snap_compare, mid_run):
    assert snap_compare(SctEdgeApp(ReplaySource(mid_run, interactive=False)), terminal_size=(80, 24))
