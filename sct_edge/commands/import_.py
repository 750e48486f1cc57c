"""`sct-edge import SOURCE STORE`: convert a pretrained LLaMA-family model (a Hugging Face directory or a GGUF
file) into a spectral store by truncated SVD, one matrix at a time; see `sct_edge.convert.importer`."""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

from tqdm import tqdm

from sct_edge.errors import SctError
from sct_edge.model.accounting import format_bytes
from sct_edge.model.config import COMPONENTS
from sct_edge.store.store import STATE_DTYPES


def _component_rank(text: str) -> int | str:
    from sct_edge.convert.importer import component_rank

    try:
        return component_rank(text)
    except SctError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import",
        help="convert a Hugging Face LLaMA directory or a GGUF file into a spectral store",
        description="Convert a pretrained LLaMA-family model into a spectral store: every matrix W becomes "
        "U diag(s) Vᵀ by a truncated SVD. Give exactly one of --rank, --energy, --full-rank, --dense; the "
        "embedding and LM head stay dense unless a per-component flag (or --full-rank) says otherwise.",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="Hugging Face model directory (config.json, safetensors, "
        "tokenizer.json) or GGUF file (LLaMA architecture)",
    )
    p.add_argument("store", metavar="STORE", help="directory to create the store in (new or empty)")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--rank", type=int, help="fixed rank of every attention and MLP matrix")
    base.add_argument(
        "--energy",
        type=float,
        help="per matrix, the smallest rank keeping this fraction of the spectral energy Σσ² (e.g. 0.95)",
    )
    base.add_argument(
        "--full-rank",
        action="store_true",
        help="every matrix, embedding and head included, at rank min(in, out): exact up to rounding",
    )
    base.add_argument("--dense", action="store_true", help="keep every matrix dense (the dense fine-tuning baseline)")
    for component in COMPONENTS:
        p.add_argument(
            f"--{component}-rank",
            type=_component_rank,
            metavar="RANK",
            help=f"rank of the {component} matrices: an integer, 'dense', 'energy' (follow --energy) "
            f"or 'full'" + (" (default: dense)" if component in ("embed", "head") else ""),
        )
    p.add_argument(
        "--state-dtype",
        choices=list(STATE_DTYPES),
        default="float32",
        help="dtype of the AdamW moments in the store (default float32)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")
    p.set_defaults(func=run)


def summary_lines(result) -> list[str]:
    """The per-component ranks, kept energy and error of an import, for the terminal."""
    lines = []
    for component, spec in result.specs.items():
        rows = [r for r in result.report if r["matrix"] == component or r["matrix"].split(".")[2:3] == [component]]
        if not rows:
            lines.append(f"  {component:<6} dense")
            continue
        ranks = [r["rank"] for r in rows]
        kept = [r["kept_energy"] for r in rows]
        errors = [r["rel_error"] for r in rows]
        lines.append(
            f"  {component:<6} {spec.describe():<12} {len(rows):>4} matrices, rank {min(ranks)}-{max(ranks)}, "
            f"kept energy {min(kept):.4f}-{max(kept):.4f}, relative error <= {max(errors):.2e}"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    from sct_edge.convert.importer import ImportPolicy, import_model, open_source

    source = open_source(args.source)
    policy = ImportPolicy(
        rank=args.rank,
        energy=args.energy,
        full_rank=args.full_rank,
        dense=args.dense,
        components={c: getattr(args, f"{c}_rank") for c in COMPONENTS if getattr(args, f"{c}_rank") is not None},
    )
    bars: dict[str, tqdm] = {}

    def bar(kind: str, total: int, **style) -> tqdm:
        if kind not in bars:
            for other in bars.values():
                other.close()
            bars[kind] = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, **style)
        return bars[kind]

    def on_matrix(row: dict, done: int, total: int) -> None:
        b = bar("factor", total, unit="matrix", desc="factoring")
        b.update(done - b.n)
        b.set_postfix_str(f"{row['matrix']} rank {row['rank']} energy {row['kept_energy']:.4f}")

    def on_shard(name: str, done: int, total: int) -> None:
        b = bar("write", total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing")
        b.update(done - b.n)
        b.set_postfix_str(name)

    try:
        result = import_model(
            source,
            Path(args.store),
            policy,
            state_dtype=args.state_dtype,
            on_matrix=None if args.quiet else on_matrix,
            on_shard=None if args.quiet else on_shard,
        )
    finally:
        for b in bars.values():
            b.close()
    c = result.config
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kind = "GGUF file" if source.path.is_file() else "Hugging Face directory"
    print(f"imported {c.name} from the {kind} {source.path} into {result.store}")
    print(
        f"  model  {c.n_layers} layers, dim {c.dim}, ffn {c.ffn_dim}, heads {c.n_heads}/{c.n_kv_heads} kv, "
        f"vocab {c.vocab_size}, {'tied' if c.tie_embeddings else 'untied'} embeddings"
    )
    for line in summary_lines(result):
        print(line)
    print(
        f"  time   {result.seconds:.1f} s ({result.convert_seconds:.1f} s reading and factoring, "
        f"{result.write_seconds:.1f} s writing the store); peak RSS {format_bytes(peak)}"
    )
    print(f"  see `sct-edge inspect {result.store}` for every matrix's rank, kept energy and error")
    return 0
