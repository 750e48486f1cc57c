"""`sct-edge memcalc` (also `tools/memcalc`): what a model at a rank costs, dense, SCT in memory, and under sct-edge.

Three answers side by side: dense training memory (the seeds' 16 B a parameter, block matrices only, and the
whole model with embeddings, head, norms and activations), SCT with everything in memory in the seeds'
accounting, and sct-edge's memory plan under a device profile (resident blocks, peak RSS, store size, I/O a
step). `--measured` puts a real run's figures beside the prediction. `--json` prints one object with stable keys.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from sct_edge.commands.former_names import workload_argument
from sct_edge.engine.plan import (
    DEFAULT_READ_BYTES_PER_S,
    DEFAULT_WRITE_BYTES_PER_S,
    FORMER_WORKLOAD_NAMES,
    RUNTIME_OVERHEAD_BYTES,
    WORKLOADS,
    MemoryPlan,
    backward_transient_elements,
    block_saved_elements,
    make_plan,
)
from sct_edge.engine.profile import load_profile, parse_size
from sct_edge.errors import SctError
from sct_edge.events import Event, StartEvent, StepEvent, parse_event
from sct_edge.model.accounting import GB, MB, count_params, format_bytes, mlp_layer_table, train_bytes
from sct_edge.model.config import ModelConfig, RankPolicy, get_preset
from sct_edge.store.manifest_file import MANIFEST, manifest_config, read_manifest

PUBLISHED_RANK = 32  # the rank of the seeds' per-layer table
CHART_WIDTH = 48
CHART_FLOOR = 10**8  # 100 MB: the left end of the log-scale bars
DEFAULTS = {"profile": "steamdeck", "batch": 1, "seq": 8, "micro_batches": 1, "workload": "lm", "clip": False}

NOTES = [
    "The seeds' 7.24 GB (7,235.5 MB on the Steam Deck) was an estimate, parameter count × 16 bytes, not a measurement.",
    "Their 70B-class (preset sct-70b) used full-size 8192 × 8192 k and v projections (LLaMA-3-70B has 8 KV heads: "
    "8192 × 1024) and counted no embeddings, LM head or norms outside the blocks, and no activations.",
    f"The runtime itself costs memory: the Python + torch process ({RUNTIME_OVERHEAD_BYTES >> 20} MiB; 220 MiB "
    "measured after import on Linux x86-64, torch 2.13 CPU, about 300 MiB in a running trainer), activations "
    "and the buffers of blocks in flight. sct-edge's predicted peak includes them; the seeds' figure does not.",
    "I/O time is the step's bytes at the stated disk speeds with no overlap: prefetching overlaps it with "
    "compute, so it is an upper bound on the time I/O adds.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", help="model preset (see `sct-edge presets`)")
    model.add_argument("--store", help="store directory: the model config is read from its manifest.json")
    rank = parser.add_mutually_exclusive_group()
    rank.add_argument(
        "--rank",
        type=int,
        help="rank of every component, embeddings and head included (default: the preset's or store's)",
    )
    rank.add_argument(
        "--energy",
        type=float,
        help="spectral-energy target in (0, 1]; only with a --store converted at that energy, whose "
        "manifest holds the per-matrix ranks it chose",
    )
    parser.add_argument("--profile", help=f"profile name or TOML path (default: {DEFAULTS['profile']})")
    parser.add_argument("--budget", help="override the profile's memory budget, e.g. 10GiB, 512MiB, 1.5GB")
    parser.add_argument("--batch", type=int, help=f"sequences per micro-batch (default: {DEFAULTS['batch']})")
    parser.add_argument("--seq", type=int, help=f"tokens per sequence (default: {DEFAULTS['seq']})")
    parser.add_argument(
        "--micro-batches",
        type=int,
        help=f"gradient-accumulation micro-batches per step (default: {DEFAULTS['micro_batches']})",
    )
    parser.add_argument(
        "--workload",
        type=workload_argument,
        choices=WORKLOADS,
        help="lm: the real model with embeddings and head (default); hidden-sum: the seeds' 70B-class step, "
        "decoder blocks only with additive attention o(q+k+v), random hidden states in, loss = their sum "
        "(formerly 'seed')",
    )
    parser.add_argument(
        "--read-speed",
        default=f"{DEFAULT_READ_BYTES_PER_S / 1e9:g}GB",
        help="disk read speed per second for the I/O time (default: %(default)s)",
    )
    parser.add_argument(
        "--write-speed",
        default=f"{DEFAULT_WRITE_BYTES_PER_S / 1e9:g}GB",
        help="disk write speed per second for the I/O time (default: %(default)s)",
    )
    parser.add_argument(
        "--measured",
        help="a run directory (its events.jsonl) or a JSON file from `sct-edge bench step --json`: "
        "print the measured figures beside the prediction",
    )
    parser.add_argument("--replicas", type=int, default=1,
                        help="ranks training the model together under torchrun: adds the gradient exchange's buffers")
    parser.add_argument("--grad-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the gradients the replicas exchange")
    parser.add_argument("--clip", action="store_true", default=None,
                        help="plan a step that clips the global gradient norm, as `sct-edge run` does by default: "
                             "with every block resident and room to spare, all gradients are held (one backward)")
    parser.add_argument("--json", action="store_true", help="one JSON object with stable keys instead of tables")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "memcalc", help="memory audit: dense vs SCT vs sct-edge under a profile (also tools/memcalc)"
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `tools/memcalc`: the same arguments and output as `sct-edge memcalc`."""
    parser = argparse.ArgumentParser(prog="memcalc", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SctError as error:
        print(f"memcalc: error: {error}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- inputs


def read_store_config(store: Path) -> ModelConfig:
    """The model config of a store, from its manifest (checked as `Store.open` checks it; no shard is read)."""
    return manifest_config(read_manifest(store), str(store / MANIFEST))


@dataclass
class Measured:
    """A run's measured figures and whatever of its setup it recorded (to predict the same thing)."""

    source: str
    steps: int
    peak_rss_bytes: int
    bytes_read: int  # per step
    bytes_written: int  # per step
    step_s: float | None
    setup: dict

    def __post_init__(self) -> None:
        # Runs and bench lines from before the rename record the hidden-sum workload as "seed".
        if "workload" in self.setup:
            self.setup["workload"] = FORMER_WORKLOAD_NAMES.get(self.setup["workload"], self.setup["workload"])


def _require(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(record.get(k), int | float) or isinstance(record.get(k), bool)]
    if missing:
        raise SctError(f"{where}: missing or non-numeric {', '.join(missing)}")


def measured_run(file: Path, events: list[Event]) -> Measured:
    """A run's figures from its typed events: the peak over every step, I/O and time medians of the steady ones."""
    steps = [e for e in events if isinstance(e, StepEvent)]
    if not steps:
        raise SctError(f"{file}: no step events (the run has not completed a step)")
    starts = [e for e in events if isinstance(e, StartEvent)]
    setup = {}
    if starts:
        start = starts[-1]
        setup = {
            "config": start.config, "profile": start.profile, "budget_bytes": start.budget_bytes,
            "batch": start.batch, "seq": start.seq, "micro_batches": start.micro_batches, "workload": start.workload,
            "clip": start.clip is not None,
        }
    # The first step pays for cold caches and lazy initialisation; steady state is the rest.
    steady = steps[1:] or steps
    return Measured(
        source=str(file),
        steps=len(steps),
        peak_rss_bytes=max(e.peak_rss_bytes for e in steps),
        bytes_read=int(statistics.median(e.bytes_read for e in steady)),
        bytes_written=int(statistics.median(e.bytes_written for e in steady)),
        step_s=statistics.median(e.step_s for e in steady),
        setup=setup,
    )


def load_measured(path: Path) -> Measured:
    """Figures from a run directory (events.jsonl), an events.jsonl file, or a `bench step --json` line."""
    file = path / "events.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise SctError(f"--measured {path}: no such file" + (" (no events.jsonl in it)" if path.is_dir() else ""))
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SctError(f"--measured {file}: cannot read it ({error})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a torn last line from a writer that was killed
            raise SctError(f"{file}:{number}: not a JSON line") from None
        if isinstance(record, dict):
            records.append((number, record))
    if any("event" in record for _, record in records):
        return measured_run(file, [parse_event(record, f"{file}:{number}") for number, record in records])
    benches = [r for _, r in records if "peak_rss_bytes" in r]
    if not benches:
        raise SctError(f"{file}: neither run events nor a `bench step --json` line with peak_rss_bytes")
    line = benches[-1]
    _require(line, ("peak_rss_bytes", "bytes_read", "bytes_written"), f"{file}")
    setup = {k: line[k] for k in ("preset", "rank", "workload", "budget_bytes") if line.get(k) is not None}
    return Measured(
        source=str(file),
        steps=int(line.get("steps", 1)),
        peak_rss_bytes=int(line["peak_rss_bytes"]),
        bytes_read=int(line["bytes_read"]),
        bytes_written=int(line["bytes_written"]),
        step_s=line.get("step_s"),
        setup=setup,
    )


def _setting(args: argparse.Namespace, setup: dict, key: str, source: str):
    """The run's recorded value, else the flag, else the default; a flag that contradicts the run is an error."""
    flag = getattr(args, key)
    if key in setup:
        if flag is not None and flag != setup[key]:
            raise SctError(f"--{key.replace('_', '-')} {flag} differs from the measured run's {setup[key]} ({source})")
        return setup[key]
    return DEFAULTS[key] if flag is None else flag


def resolve_config(args: argparse.Namespace, setup: dict, source: str, workload: str) -> tuple[ModelConfig, str]:
    """The model to account for, and a label saying where it came from."""
    recorded = "config" in setup or "preset" in setup
    if recorded and (args.preset or args.store or args.rank is not None or args.energy is not None):
        raise SctError(f"the measured run records its model ({source}); drop --preset/--store/--rank/--energy")
    if args.energy is not None and not 0.0 < args.energy <= 1.0:
        raise SctError(f"--energy must be in (0, 1], not {args.energy}")
    if args.rank is not None and args.rank < 1:
        raise SctError(f"--rank must be at least 1, not {args.rank}")
    if "config" in setup:
        config, label = ModelConfig.from_dict(setup["config"]), f"measured run {source}"
    elif "preset" in setup:
        config, label = get_preset(setup["preset"]), f"preset {setup['preset']} (measured run)"
        if setup.get("rank") is not None:
            config = config.with_ranks(RankPolicy.uniform(setup["rank"]))
    elif args.store:
        config, label = read_store_config(Path(args.store)), f"store {args.store}"
    elif args.preset:
        config, label = get_preset(args.preset), f"preset {args.preset}"
    else:
        raise SctError("give --preset NAME or --store DIR (or --measured with a run that records its model)")
    if args.energy is not None:
        if not args.store:
            raise SctError(
                "--energy needs --store DIR: an energy target picks each matrix's rank from its singular values, "
                "which only converted weights have; for a preset use --rank"
            )
        stored_energy = config.ranks.energy
        if stored_energy is None or not config.ranks.overrides:
            raise SctError(f"store {args.store} was not converted by energy (no per-matrix ranks); use --rank")
        if not math.isclose(stored_energy, args.energy, rel_tol=0, abs_tol=1e-9):
            raise SctError(
                f"store {args.store} was converted at energy {stored_energy:g}; its ranks for {args.energy:g} are "
                f"unknown without the dense weights (re-import with --energy {args.energy:g})"
            )
    if args.rank is not None:
        config = config.with_ranks(RankPolicy.uniform(args.rank))
    if workload == "hidden-sum" and "config" not in setup:
        if config.n_kv_heads != config.n_heads:
            raise SctError(
                f"--workload hidden-sum runs the additive attention o(q+k+v), which needs full-size k and v; "
                f"{config.name} has {config.n_kv_heads} KV heads for {config.n_heads} query heads "
                "(try --preset sct-70b)"
            )
        config.attention = "additive"  # the seeds' step, as `sct-edge bench step --workload hidden-sum` runs it
    config.validate()
    return config, label


# ---------------------------------------------------------------- accounting


def activation_bytes_in_memory(config: ModelConfig, batch: int, seq: int, workload: str) -> int:
    """Activations of a whole-model step with no checkpointing (every block's internals kept), fp32."""
    saved = sum(block_saved_elements(config, i, batch, seq) for i in range(config.n_layers))
    elements = saved + backward_transient_elements(config, batch, seq) + batch * seq * config.dim
    if workload == "lm":
        elements += 3 * batch * seq * config.vocab_size
    return elements * 4


def percent_error(predicted: int, measured: int) -> float | None:
    if measured == 0:
        return 0.0 if predicted == 0 else None
    return (predicted - measured) / measured * 100


def build_report(config: ModelConfig, label: str, plan: MemoryPlan, measured: Measured | None) -> dict:
    count = count_params(config)
    workload, batch, seq = plan.workload, plan.batch, plan.seq
    lm = workload == "lm"
    # Every matrix dense (sct_edge.model.transformer.dense_config, built here so memcalc never pays torch's import).
    dense = config.with_ranks(RankPolicy(attn=None, mlp=None, embed=None, head=None))
    dense_whole = {
        "block_matrices": train_bytes(count.published_dense_equivalent),
        "norms": train_bytes(count.block_norms.dense + (count.final_norm.dense if lm else 0)),
        "embedding": train_bytes(count.embed.dense) if lm else 0,
        "lm_head": train_bytes(count.head.dense) if lm else 0,
        "activations": activation_bytes_in_memory(dense, batch, seq, workload),
    }
    dense_whole["total"] = sum(dense_whole.values())
    sct_whole = {
        "block_factors_and_norms": train_bytes(count.published_spectral),
        "embedding_head_final_norm": train_bytes(count.embed.stored + count.head.stored + count.final_norm.stored)
        if lm
        else 0,
        "activations": activation_bytes_in_memory(config, batch, seq, workload),
    }
    sct_whole["total"] = sum(sct_whole.values())
    dense_train, sct_train = train_bytes(count.published_dense_equivalent), train_bytes(count.published_spectral)

    def table(rank: int) -> list[dict]:
        return [
            {
                "model": r.model,
                "in": r.n_in,
                "out": r.n_out,
                "rank": r.rank,
                "dense_train_bytes": r.dense_train_bytes,
                "sct_train_bytes": r.sct_train_bytes,
                "compression": r.compression,
            }
            for r in mlp_layer_table(rank)
            if rank <= min(r.n_in, r.n_out)
        ]

    mlp_rank = config.ranks.mlp
    report = {
        "model": config.name,
        "source": label,
        "ranks": {c: getattr(config.ranks, c) for c in ("attn", "mlp", "embed", "head")},
        "energy": config.ranks.energy,
        "per_matrix_ranks": bool(config.ranks.overrides),
        "workload": workload,
        "batch": batch,
        "seq": seq,
        "micro_batches": plan.micro_batches,
        "params": {
            "published_dense_equivalent": count.published_dense_equivalent,
            "published_spectral": count.published_spectral,
            "dense_total": count.dense_total,
            "stored_total": count.stored_total,
        },
        "dense_train_bytes": dense_train,
        "dense_whole_model": dense_whole,
        "dense_whole_model_bytes": dense_whole["total"],
        "sct_in_memory_bytes": sct_train,
        "sct_in_memory_whole_model": sct_whole,
        "sct_in_memory_whole_model_bytes": sct_whole["total"],
        "compression": dense_train / sct_train,
        "profile": plan.profile,
        "budget_bytes": plan.budget_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "store_bytes": plan.store_bytes,
        "io_read_bytes_per_step": plan.io_read_bytes_per_step,
        "io_write_bytes_per_step": plan.io_write_bytes_per_step,
        "io_bytes_per_step": plan.io_bytes_per_step,
        "io_seconds_per_step": plan.io_seconds_per_step,
        "plan": plan.to_dict(),
        "layer_table_rank": PUBLISHED_RANK,
        "layer_table": table(PUBLISHED_RANK),
        "layer_table_at_rank": table(mlp_rank) if mlp_rank not in (None, PUBLISHED_RANK) else None,
        "measured": None,
        "notes": NOTES + plan.notes,
    }
    if measured is not None:
        pairs = {
            "peak_rss_bytes": (plan.predicted_peak_bytes, measured.peak_rss_bytes),
            "bytes_read_per_step": (plan.io_read_bytes_per_step, measured.bytes_read),
            "bytes_written_per_step": (plan.io_write_bytes_per_step, measured.bytes_written),
        }
        report["measured"] = {
            "source": measured.source,
            "steps": measured.steps,
            "step_s": measured.step_s,
            **{key: m for key, (_, m) in pairs.items()},
            "predicted": {key: p for key, (p, _) in pairs.items()},
            "error_percent": {key: percent_error(p, m) for key, (p, m) in pairs.items()},
        }
    return report


# ---------------------------------------------------------------- output


def gb(n: float) -> str:
    return f"{n / GB:,.1f} GB" if n >= 100 * GB else f"{n / GB:,.2f} GB"


def bar_chart(rows: list[tuple[str, int]]) -> list[str]:
    """Horizontal bars on a log scale from 100 MB to the largest value."""
    top = max(v for _, v in rows)
    span = math.log10(max(top, CHART_FLOOR * 10) / CHART_FLOOR)
    label_width = max(len(name) for name, _ in rows)
    lines = [f"memory (log scale: the bar starts at 100 MB, each █ is ×{10 ** (span / CHART_WIDTH):.2f})"]
    for name, value in rows:
        length = round(CHART_WIDTH * math.log10(max(value, CHART_FLOOR) / CHART_FLOOR) / span)
        lines.append(f"  {name:<{label_width}} {gb(value):>12}  {'█' * max(length, 1)}")
    return lines


def render(report: dict, plan: MemoryPlan) -> list[str]:
    r, p = report, report["params"]
    ranks = " / ".join("-" if v is None else str(v) for v in r["ranks"].values())
    ranks_note = " (per-matrix ranks from energy " + f"{r['energy']:g})" if r["per_matrix_ranks"] else ""
    lines = [
        f"memcalc: {r['model']} ({r['source']}), ranks attn / mlp / embed / head = {ranks}{ranks_note}",
        "GB/MB = 10⁹/10⁶ bytes as the seeds publish; the plan uses GiB/MiB = 2³⁰/2²⁰ bytes",
        "",
        "training memory, fp32 weights + gradients + two Adam moments = 16 bytes a parameter",
        f"  dense + Adam, seeds' count (block matrices only, {p['published_dense_equivalent']:,} params): "
        f"{gb(r['dense_train_bytes'])}",
        f"  dense + Adam, whole model ({p['dense_total']:,} params, workload {r['workload']}, batch {r['batch']} × "
        f"seq {r['seq']}): {gb(r['dense_whole_model_bytes'])}",
    ]
    labels = {
        "block_matrices": "block matrices",
        "norms": "RMSNorm weights",
        "embedding": "embedding",
        "lm_head": "LM head",
        "activations": "activations (no checkpointing)",
    }
    for key, name in labels.items():
        if r["dense_whole_model"][key]:
            lines.append(f"      {name:<32}{gb(r['dense_whole_model'][key]):>14}")
    lines += [
        f"  SCT + Adam in memory, seeds' count (block factors + norms, {p['published_spectral']:,} params): "
        f"{gb(r['sct_in_memory_bytes'])} = {r['sct_in_memory_bytes'] / MB:,.1f} MB; {r['compression']:.0f}× smaller",
        f"  SCT + Adam in memory, whole model (+ embedding, head, activations): "
        f"{gb(r['sct_in_memory_whole_model_bytes'])}",
        "",
        f"sct-edge under profile {r['profile']}:",
        *plan.describe(),
        "",
    ]
    chart = [
        ("dense + Adam (seeds' count)", r["dense_train_bytes"]),
        ("dense + Adam (whole model)", r["dense_whole_model_bytes"]),
        ("SCT in memory (seeds' count)", r["sct_in_memory_bytes"]),
        (f"sct-edge peak RSS ({r['profile']})", r["predicted_peak_bytes"]),
        (f"budget ({r['profile']})", r["budget_bytes"]),
        ("store on disk", r["store_bytes"]),
    ]
    lines += bar_chart(chart) + [""]
    lines.append(
        f"one MLP matrix, weights + gradients + Adam (fp32), rank {r['layer_table_rank']} "
        f"(the seeds' published table)" + (f" and rank {r['ranks']['mlp']}" if r["layer_table_at_rank"] else "")
    )
    at_rank = {row["model"]: row for row in r["layer_table_at_rank"] or []}
    header = f"  {'model':<14}{'in × out':>14}{'dense + Adam':>14}{'SCT k=32':>11}{'×':>6}"
    if at_rank:
        k = r["ranks"]["mlp"]
        header += f"{f'SCT k={k}':>12}{'×':>6}"
    lines.append(header)
    for row in r["layer_table"]:
        line = (
            f"  {row['model']:<14}{row['in']:>6} × {row['out']:<6}{row['dense_train_bytes'] / MB:>11,.1f} MB"
            f"{row['sct_train_bytes'] / MB:>8.1f} MB{row['compression']:>5.0f}×"
        )
        other = at_rank.get(row["model"])
        if at_rank:
            line += (
                f"{other['sct_train_bytes'] / MB:>9.1f} MB{other['compression']:>5.0f}×"
                if other
                else f"{'(rank too big)':>18}"
            )
        lines.append(line)
    if r["measured"]:
        m = r["measured"]
        lines += [
            "",
            f"measured ({m['source']}, {m['steps']} step(s)"
            + (f", {m['step_s']:.2f} s a step" if m["step_s"] is not None else "")
            + "):",
        ]
        lines.append(f"  {'':<24}{'predicted':>12}{'measured':>12}{'error':>10}")
        for key, name in (
            ("peak_rss_bytes", "peak RSS"),
            ("bytes_read_per_step", "read per step"),
            ("bytes_written_per_step", "written per step"),
        ):
            error = m["error_percent"][key]
            shown = "n/a" if error is None else f"{error:+.1f} %"
            lines.append(f"  {name:<24}{format_bytes(m['predicted'][key]):>12}{format_bytes(m[key]):>12}{shown:>10}")
    lines += ["", "notes:"] + [f"  - {note}" for note in r["notes"]]
    return lines


def run(args: argparse.Namespace) -> int:
    measured = load_measured(Path(args.measured)) if args.measured else None
    setup = measured.setup if measured else {}
    source = measured.source if measured else ""
    workload = _setting(args, setup, "workload", source)
    config, label = resolve_config(args, setup, source, workload)
    batch = _setting(args, setup, "batch", source)
    seq = _setting(args, setup, "seq", source)
    micro = _setting(args, setup, "micro_batches", source)
    profile = load_profile(_setting(args, setup, "profile", source), args.budget)
    if "budget_bytes" in setup:
        if args.budget is not None and profile.memory_budget != setup["budget_bytes"]:
            raise SctError(f"--budget {args.budget} differs from the measured run's {setup['budget_bytes']} bytes")
        profile.memory_budget = int(setup["budget_bytes"])
    read_speed = parse_size(args.read_speed, "--read-speed")
    write_speed = parse_size(args.write_speed, "--write-speed")
    if args.replicas < 1:
        raise SctError("--replicas must be at least 1")
    plan = make_plan(config, profile, batch, seq, micro, workload, read_speed, write_speed, args.replicas,
                     args.grad_dtype, _setting(args, setup, "clip", source))
    report = build_report(config, label, plan, measured)
    if args.json:
        print(json.dumps(report))
    else:
        print("\n".join(render(report, plan)))
    return 0
