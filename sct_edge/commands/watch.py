"""`sct-edge watch RUN_DIR`: the run screen of the TUI over another run's event stream (read-only)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("watch", help="open the TUI on another run's events (RUN_DIR/events.jsonl), read-only")
    p.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="the run directory holding events.jsonl (`sct-edge run --run-dir`; default STORE.runs/); "
        "a store directory works too",
    )
    p.set_defaults(func=run)


def run_dir_of(path: Path) -> Path:
    """A store directory stands for its default run directory, STORE.runs/ (where `sct-edge run` writes)."""
    path = path.resolve()
    runs = path.with_name(path.name + ".runs")
    if not (path / "events.jsonl").exists() and (runs / "events.jsonl").is_file():
        return runs
    return path


def run(args: argparse.Namespace) -> int:
    from sct_edge.tui.app import watch_run

    return watch_run(run_dir_of(args.run_dir))
