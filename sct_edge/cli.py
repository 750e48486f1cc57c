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
# At libgomp's default (300,000) the second core is still busy spinning when the retraction's OpenBLAS threads
# want it, right after AdamW: a llama3-8b r128 block's retraction took 26.6-33.4 ms by default and 18.6-24.1 ms
# at 10,000, 30,000 or 100,000 (medians of 15, three processes each); 100,000 is the longest of those, so
# the gaps between a step's torch ops, and the rank-32 retraction's torch products between its small LAPACK
# calls, still find the team awake (sct-70b r32: 9.4-11.2 ms a block against 9.6-10.9 by default).
# libgomp reads the variable once, when torch loads: `main` sets it before any command imports torch, unless
# the user has.
OPENMP_SPIN_ITERATIONS = "100000"

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
