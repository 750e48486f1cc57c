"""`sct-edge export STORE OUT`: write a store as a dense Hugging Face LLaMA directory, one matrix at a time;
see `sct_edge.convert.exporter`."""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

from sct_edge.model.accounting import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    from sct_edge.convert.exporter import EXPORT_DTYPES

    p = subparsers.add_parser("export", help="write a store as a dense Hugging Face LLaMA directory")
    p.add_argument("store", metavar="STORE", help="store directory")
    p.add_argument("out", metavar="OUT", help="output directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument(
        "--dtype",
        choices=list(EXPORT_DTYPES),
        default="float32",
        help="dtype of the exported weights (default float32, exact)",
    )
    p.add_argument(
        "--max-shard-size",
        default="2GiB",
        help="largest safetensors file before the weights are split with an index (default 2GiB)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sct_edge.convert.exporter import export_store
    from sct_edge.engine.profile import parse_size

    result = export_store(
        Path(args.store),
        Path(args.out),
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size, "--max-shard-size"),
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"exported {args.store} to {result.out} ({args.dtype}): {format_bytes(result.bytes)} in "
        f"{len(result.files)} files, {result.seconds:.1f} s, peak RSS {format_bytes(peak)}"
    )
    print("  " + ", ".join(result.files))
    return 0
