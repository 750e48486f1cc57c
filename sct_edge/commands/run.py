"""`sct-edge run`: train under a device profile, in the TUI on a terminal or with plain progress otherwise."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from sct_edge.engine.process import ProcessSettings, configure_process, signals_handled_by
from sct_edge.engine.profile import available_cores, load_profile, resolve_device
from sct_edge.flags import add_flags, from_flags
from sct_edge.parallel.world import detect_world, expand_rank, join_world, leave_world
from sct_edge.train.trainer import RunConfig, Trainer


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="train a model under a device profile (the embedded default without --store)")
    add_flags(p, RunConfig)
    p.add_argument("--no-tui", action="store_true", help="plain progress output even on a terminal")
    p.set_defaults(func=run)


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run settings the command line gives, checked."""
    return from_flags(RunConfig, args).checked()


def run(args: argparse.Namespace) -> int:
    from sct_edge.events import EventLog
    from sct_edge.train.control import Control
    from sct_edge.train.progress import PlainProgress

    config = run_config_from_args(args)
    # Under torchrun this process is one replica: `{rank}` in --store and --run-dir names its own copy.
    world = detect_world()
    config = dataclasses.replace(config, store=expand_rank(config.store, world),
                                 run_dir=expand_rank(config.run_dir, world))
    control = Control()
    run_dir = config.run_dir or config.store_path().with_name(config.store_path().name + ".runs")
    events_path = run_dir / "events.jsonl"

    profile = load_profile(config.profile, config.budget)
    # Ranks that share a machine share its cores.
    configure_process(ProcessSettings.for_profile(profile, min(profile.usable_threads(),
                                                               world.threads(available_cores()))))
    join_world(world, resolve_device(profile).type, config.peer_timeout)
    logs: list[EventLog] = []

    def make_trainer(listeners: list) -> Trainer:
        logs.append(EventLog(events_path, listeners))
        return Trainer(config, logs[-1], control, world)

    # SIGINT and SIGTERM finish the step in flight, commit and exit: a second signal is the same request.
    with signals_handled_by(control.stop):
        try:
            if sys.stdout.isatty() and not args.no_tui and world.rank == 0:
                from sct_edge.tui.app import run_tui

                return run_tui(make_trainer, control)
            progress = PlainProgress()
            try:
                return make_trainer([progress]).run()
            finally:
                progress.close()
        finally:
            for log in logs:
                log.close()
            leave_world()
