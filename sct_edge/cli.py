"""The `sct-edge` command line: argparse subcommands, one module each under `sct_edge/commands/`.

Every subcommand module exposes `register(subparsers)`, which adds its parser and sets `func`.
Bad input surfaces as `SctError`: one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sct_edge.errors import SctError, Terminated

# How long torch's OpenMP workers spin after a parallel region before they sleep, in libgomp's iterations.
# libgomp's default (300,000, milliseconds) keeps the second core busy spinning while the step's own Python
# threads want it: the retraction's OpenBLAS work right after AdamW took 27.1 ms a llama3-8b block by default,
# 22.6 ms at 10,000 and 20.1 ms when the workers had gone to sleep first; llama3-8b r128 steps of 8 blocks
# spent 0.25-0.30 s in retraction against 0.30-0.38 s, their forward and backward no slower (docs/benchmarks.md).
# 10,000 still outlasts the gap between two torch ops of a step, so those find the team awake. libgomp reads
# the variable once, when torch loads: `main` sets it before any command imports torch, unless the user has.
OPENMP_SPIN_ITERATIONS = "10000"

# Order is the order `sct-edge --help` lists them in.
COMMAND_MODULES = [
    "presets",
    "init",
    "inspect",
    "verify",
    "import_",
    "export",
    "run",
    "watch",
    "eval",
    "generate",
    "bench",
    "profiles",
    "memcalc",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sct-edge",
        description="Train LLaMA-family models on edge devices with Spectral Compact Training.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"sct_edge.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_ITERATIONS)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except SctError as error:
        print(f"sct-edge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sct-edge: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("sct-edge: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # The reader went away (`sct-edge presets | head`): stop quietly, as other command-line tools do. Python
        # would flush stdout again at exit and fail once more, so point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
