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
