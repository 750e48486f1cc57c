"""`sct-edge run`: train under a device profile, in the TUI on a terminal or with plain progress otherwise."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from sct_edge.errors import SctError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="train a model under a device profile (the embedded default without --store)")
    p.add_argument("--profile", default="steamdeck", help="profile name (profiles/NAME.toml) or path to a TOML file")
    p.add_argument("--budget", help="override the profile's memory budget, e.g. 1GiB or 512MB")
    p.add_argument("--store", type=Path, help="store directory to train (created from --preset if missing); "
                   "default: the embedded default store in the user's data directory")
    p.add_argument("--preset", help="preset for a new store (default: tiny; see `sct-edge presets`); with an "
                   "existing store it must match the model the store holds")
    p.add_argument("--rank", type=int, help="rank of every spectral component of a new store (default: the preset's)")
    p.add_argument("--dense", action="store_true", help="train the same architecture with dense weights (baseline)")
    p.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="text files or directories to train on (default: the Python standard library's source)")
    p.add_argument("--steps", type=int, help="total optimizer steps of the run (a resumed run stops at the same step)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop (and commit) after this wall-clock time")
    p.add_argument("--batch", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient-accumulation micro-batches per step")
    p.add_argument("--lr-spectral", type=float, default=1e-2, help="peak learning rate of spectral factors U, s, V")
    p.add_argument("--lr-dense", type=float, default=3e-3, help="peak learning rate of dense parameters (norms, ...)")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (dense matrices and s)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip; 0 disables it")
    p.add_argument("--eval-every", type=int, default=100, help="validation every N steps (0: only at the end)")
    p.add_argument("--commit-every", type=int, help="commit the store every N steps (default: the profile's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--run-dir", type=Path, help="where events.jsonl goes (default: STORE.runs/)")
    p.add_argument("--resume", action="store_true", help="continue the store's run exactly where it was committed")
    p.add_argument("--no-tui", action="store_true", help="plain progress output even on a terminal")
    p.set_defaults(func=run)


def run_config_from_args(args: argparse.Namespace):
    from sct_edge.train.trainer import RunConfig

    for flag in ("batch", "seq", "micro_batches"):
        if getattr(args, flag) < 1:
            raise SctError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise SctError("--steps must be at least 1")
    for path in args.data:
        if not Path(path).exists():
            raise SctError(f"--data {path}: no such file or directory")
    return RunConfig(
        profile=args.profile, budget=args.budget, store=args.store, preset=args.preset, rank=args.rank,
        dense=args.dense, data=[str(Path(p).resolve()) for p in args.data], steps=args.steps,
        time_limit_s=args.time_limit, batch=args.batch, seq=args.seq, micro_batches=args.micro_batches,
        lr_spectral=args.lr_spectral, lr_dense=args.lr_dense, warmup=args.warmup, weight_decay=args.weight_decay,
        clip=args.clip or None, eval_every=args.eval_every, commit_every=args.commit_every, seed=args.seed,
        run_dir=args.run_dir, resume=args.resume,
    )


def run(args: argparse.Namespace) -> int:
    from sct_edge.events import EventLog
    from sct_edge.train.control import Control
    from sct_edge.train.progress import PlainProgress
    from sct_edge.train.trainer import Trainer

    config = run_config_from_args(args)
    control = Control()
    run_dir = config.run_dir or config.store_path().with_name(config.store_path().name + ".runs")
    events_path = run_dir / "events.jsonl"

    for sig in (signal.SIGINT, signal.SIGTERM):
        # Finish the step in flight, commit, exit: a second signal is the same request.
        signal.signal(sig, lambda *_: control.stop())
    logs: list[EventLog] = []

    def make_trainer(listeners: list) -> Trainer:
        logs.append(EventLog(events_path, listeners))
        return Trainer(config, logs[-1], control)

    try:
        if sys.stdout.isatty() and not args.no_tui:
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
