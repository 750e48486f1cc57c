"""`sct-edge verify STORE`: full integrity check of a store, modifying nothing.

Checks the manifest, every shard's size, header and crc32, and the tokenizer file; prints one OK line, or
fails with a one-line error naming the first bad shard and what is wrong with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sct_edge.model.accounting import format_bytes
from sct_edge.store.store import Store


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("verify", help="check every shard of a store against its checksums")
    parser.add_argument("store", metavar="STORE", help="store directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with Store.open(Path(args.store)) as store:
        report = store.verify()
    rate = report.bytes / report.seconds / 1e6 if report.seconds else 0.0
    print(
        f"{args.store}: OK: step {report.step}, {report.shards} shards and the tokenizer, "
        f"{format_bytes(report.bytes)} checked in {report.seconds:.1f} s ({rate:.0f} MB/s)"
    )
    return 0
