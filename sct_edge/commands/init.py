"""`sct-edge init`: create a store holding a randomly initialised spectral model, streamed shard by shard.

Only one part of the model (a block, the embedding or the head) is built at a time, so creating a 70B
store needs a few hundred MB of RAM; the command reports the time, throughput and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch
from tqdm import tqdm

from sct_edge.engine.process import ProcessSettings, configure_process
from sct_edge.errors import SctError
from sct_edge.model.accounting import format_bytes
from sct_edge.model.config import COMPONENTS, PRESETS, get_preset
from sct_edge.store.store import STATE_DTYPES, Store


def rank_arg(text: str) -> int | str:
    """An integer rank or the word 'dense'."""
    if text == "dense":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an integer or 'dense', not '{text}'") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("init", help="create a new store with a randomly initialised spectral model")
    parser.add_argument("store", metavar="STORE", help="directory to create the store in (new or empty)")
    parser.add_argument("--preset", required=True, help=f"model architecture: {', '.join(PRESETS)}")
    parser.add_argument(
        "--rank",
        type=rank_arg,
        default=None,
        help="rank of every matrix (attention, MLP, embedding, head): an integer or 'dense' "
        "(default: the preset's own rank policy)",
    )
    for component in COMPONENTS:
        parser.add_argument(
            f"--{component}-rank",
            type=rank_arg,
            default=None,
            help=f"rank of the {component} matrices (an integer or 'dense'); overrides --rank",
        )
    parser.add_argument(
        "--energy",
        type=float,
        default=None,
        help="not accepted here: choosing ranks by kept spectral energy needs a source model's "
        "singular values; use `sct-edge import`",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    parser.add_argument(
        "--state-dtype",
        choices=list(STATE_DTYPES),
        default="float32",
        help="dtype of the AdamW moments on disk (default float32)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for building the initial tensors (default: torch's own choice); the "
        "QR of the init is several times faster on 1 thread on a busy two-core machine, and "
        "its last bits depend on the thread count",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes


def run(args: argparse.Namespace) -> int:
    if args.energy is not None:
        raise SctError(
            "--energy chooses ranks from a source model's singular values and has no meaning for a "
            "random init: use `sct-edge import --energy`, or give --rank"
        )
    config = get_preset(args.preset)
    ranks = config.ranks
    if args.rank is not None:
        for component in COMPONENTS:
            setattr(ranks, component, None if args.rank == "dense" else args.rank)
    for component in COMPONENTS:
        value = getattr(args, f"{component}_rank")
        if value is not None:
            setattr(ranks, component, None if value == "dense" else value)
    config.validate()
    if args.threads is not None and args.threads < 1:
        raise SctError(f"--threads must be at least 1, not {args.threads}")
    configure_process(ProcessSettings(threads=args.threads))  # torch's own thread count without --threads

    bar = tqdm(total=0, unit="B", unit_scale=True, desc="init", disable=args.json or not sys.stderr.isatty())

    def progress(name: str, done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        bar.set_postfix_str(name)

    try:
        store = Store.create(args.store, config, seed=args.seed, state_dtype=args.state_dtype, progress=progress)
    finally:
        bar.close()
    stats = store.create_stats
    store.close()
    result = {
        "store": str(args.store),
        "preset": args.preset,
        "ranks": {c: getattr(ranks, c) for c in COMPONENTS},
        "seed": args.seed,
        "state_dtype": args.state_dtype,
        "shards": stats.shards,
        "bytes": stats.bytes,
        "seconds": round(stats.seconds, 3),
        "mb_per_s": round(stats.bytes / stats.seconds / 1e6, 1),
        "generate_seconds": round(stats.generate_seconds, 3),
        "write_seconds": round(stats.write_seconds, 3),
        "data_bytes_written": stats.data_bytes_written,
        "threads": torch.get_num_threads(),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    ranks_text = " / ".join(f"{c} {'dense' if v is None else v}" for c, v in result["ranks"].items())
    write_rate = stats.data_bytes_written / stats.write_seconds / 1e6 if stats.write_seconds else 0.0
    print(f"created {args.store}: {args.preset}, ranks {ranks_text}, seed {args.seed}, {args.state_dtype} moments")
    print(
        f"  {stats.shards} shards, {format_bytes(stats.bytes)} in {stats.seconds:.1f} s ({result['mb_per_s']:.0f} MB/s)"
    )
    print(
        f"  building tensors {stats.generate_seconds:.1f} s; writing {stats.write_seconds:.1f} s, overlapped "
        f"({format_bytes(stats.data_bytes_written)} of weights at {write_rate:.0f} MB/s, "
        f"zero moments preallocated)"
    )
    print(f"  peak resident memory {format_bytes(result['peak_rss_bytes'])}")
    return 0
