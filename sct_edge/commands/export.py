"""`sct-edge export STORE OUT`: write a store as a dense Hugging Face LLaMA directory, or as a llama.cpp GGUF
file when OUT ends in .gguf, one matrix at a time; see `sct_edge.convert.exporter` and
`sct_edge.convert.gguf_writer`."""

from __future__ import annotations

import argparse
import resource
import signal
from pathlib import Path

from sct_edge.errors import SctError, raise_terminated
from sct_edge.model.accounting import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    from sct_edge.convert.exporter import EXPORT_DTYPES

    p = subparsers.add_parser(
        "export", help="write a store as a dense Hugging Face LLaMA directory or a llama.cpp GGUF file"
    )
    p.add_argument("store", metavar="STORE", help="store directory")
    p.add_argument(
        "out",
        metavar="OUT",
        help="output directory (config.json, model.safetensors, tokenizer.json), or a file ending in .gguf "
        "for llama.cpp, ollama and LM Studio",
    )
    p.add_argument(
        "--dtype",
        choices=list(EXPORT_DTYPES),
        help="dtype of the exported weights of a Hugging Face directory (default float32, exact)",
    )
    p.add_argument(
        "--outtype",
        help="weight type of a .gguf export: f32 (exact), f16 (default), bf16 or q8_0; norms stay f32",
    )
    p.add_argument(
        "--ollama",
        action="store_true",
        help="with a .gguf export, also write an ollama Modelfile beside it (`ollama create NAME -f Modelfile`)",
    )
    p.add_argument(
        "--max-shard-size",
        default="2GiB",
        help="largest safetensors file before the weights are split with an index (default 2GiB)",
    )
    p.set_defaults(func=run)


def run_gguf(args: argparse.Namespace) -> int:
    from sct_edge.convert.gguf_writer import DEFAULT_OUTTYPE, export_gguf

    result = export_gguf(Path(args.store), Path(args.out), outtype=args.outtype or DEFAULT_OUTTYPE, ollama=args.ollama)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"exported {args.store} to {result.out} (GGUF, {result.outtype}): {format_bytes(result.bytes)}, "
        f"{result.tensors} tensors, {result.seconds:.1f} s, peak RSS {format_bytes(peak)}"
    )
    for note in result.notes:
        print(f"  note: {note}")
    if result.modelfile is not None:
        print(f"  wrote {result.modelfile}: ollama create NAME -f {result.modelfile}")
    return 0


def run(args: argparse.Namespace) -> int:
    from sct_edge.engine.process import signals_handled_by

    # SIGTERM unwinds like Ctrl-C, so a partial GGUF file or staging directory is removed on the way out.
    with signals_handled_by(raise_terminated, (signal.SIGTERM,)):
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from sct_edge.convert.exporter import export_store
    from sct_edge.engine.profile import parse_size

    if args.out.endswith(".gguf"):
        if args.dtype is not None:
            raise SctError(f"{args.out}: --dtype applies to Hugging Face exports; a .gguf export takes --outtype")
        return run_gguf(args)
    args.dtype = args.dtype or "float32"
    if args.outtype is not None or args.ollama:
        raise SctError(f"{args.out}: --outtype and --ollama apply to GGUF exports (an OUT ending in .gguf)")

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
