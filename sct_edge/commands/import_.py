"""`sct-edge import SOURCE STORE`: convert a pretrained LLaMA-family model (a Hugging Face directory or a GGUF
file) into a spectral store by truncated SVD, one matrix at a time, or with --calibrate by output-aware
truncation and block-wise recovery, one block at a time; see `sct_edge.convert.importer`."""

from __future__ import annotations

import argparse
import resource
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from sct_edge.convert.calibration import CalibrationConfig
from sct_edge.convert.distillation import DistillConfig
from sct_edge.convert.recovery import RecoveryConfig
from sct_edge.errors import SctError, raise_terminated
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
        "U diag(s) Vᵀ by a truncated SVD, or with --calibrate by the rank-k factors that best keep its outputs on "
        "the calibration text, block by block, each block then trained towards the dense one (recovery). Give "
        "exactly one of --rank, --energy, --params-ratio, --size, --full-rank, --dense; the embedding and LM head "
        "stay dense unless a per-component flag (or --full-rank) says otherwise.",
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
    base.add_argument(
        "--params-ratio",
        type=float,
        metavar="R",
        help="store R (0 < R <= 1) times the numbers of the dense attention and MLP matrices, ranks spread across "
        "matrices by output error (weight error without --calibrate) per stored number, each at least half "
        "its uniform rank",
    )
    base.add_argument(
        "--size",
        metavar="SIZE",
        help="target store size (weights and AdamW moments), e.g. 300MB: ranks spread as with --params-ratio",
    )
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
    calib = p.add_argument_group("calibrated conversion (output-aware truncation, then block-wise recovery)")
    calib.add_argument(
        "--calibrate",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="UTF-8 text file(s), or .jsonl files in the formats `run` reads (text, prompt/completion, chat "
        "messages rendered with the model's template), to calibrate on: each matrix keeps its outputs on this "
        "text rather than its weights (and --energy is measured on outputs)",
    )
    calib.add_argument(
        "--calib-tokens",
        type=int,
        default=16384,
        help="calibration tokens (default 16384), in whole sequences shared equally by the files and spread "
        "evenly over each file's text",
    )
    calib.add_argument(
        "--calib-seq-len", type=int, default=512, help="tokens a calibration sequence (default 512, capped at the "
        "model's context)"
    )
    calib.add_argument(
        "--statistics",
        choices=["sequential", "dense"],
        default="sequential",
        help="sequential (default): each block's input statistics come through the blocks already converted; "
        "dense: all from the original model (one-shot)",
    )
    calib.add_argument(
        "--recover-steps",
        type=int,
        help="steps of block-wise recovery after each block is converted (default 100 with --calibrate; 0: none)",
    )
    calib.add_argument(
        "--recover-tokens", type=int, default=RecoveryConfig.batch_tokens, help="calibration tokens a recovery step "
        f"trains on, whole sequences drawn at random (default {RecoveryConfig.batch_tokens})"
    )
    calib.add_argument(
        "--recover-lr", type=float, default=RecoveryConfig.lr, help=f"AdamW learning rate of recovery on U, s and V "
        f"(default {RecoveryConfig.lr:g})"
    )
    calib.add_argument(
        "--distill-steps", type=int, default=0, help="steps of whole-model distillation after the blocks are "
        "converted: every block's factors trained together towards the dense model's next-token distributions on "
        "the calibration text, through the training engine under the --profile/--budget (default 0: none)"
    )
    calib.add_argument(
        "--distill-lr", type=float, default=DistillConfig.lr, help=f"AdamW learning rate of distillation on U, s "
        f"and V (default {DistillConfig.lr:g})"
    )
    calib.add_argument(
        "--distill-tokens", type=int, default=DistillConfig.batch_tokens, help="calibration tokens a distillation "
        f"step trains on, whole sequences drawn at random (default {DistillConfig.batch_tokens})"
    )
    calib.add_argument(
        "--budget",
        metavar="SIZE",
        help="RAM the calibrated import may use, e.g. 3GiB: checked up front (a one-line error when even one "
        "block cannot fit), and the activation streams are spilled to files next to the store, removed "
        "afterwards, when they would not fit in RAM (default: the --profile's memory_budget, else no budget)",
    )
    calib.add_argument(
        "--profile",
        metavar="NAME",
        help="device profile (steamdeck, m4pro, ci, or a TOML path) whose memory_budget is the --budget",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own choice; on a busy machine 1 thread can be several times faster)",
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


def calibration_config(args: argparse.Namespace) -> CalibrationConfig | None:
    """The calibration the flags ask for, None without --calibrate; SctError for flags that need it."""
    from sct_edge.engine.profile import load_profile, parse_size

    if args.calibrate is None:
        for flag, value in (("--recover-steps", args.recover_steps), ("--statistics", args.statistics != "sequential"),
                            ("--distill-steps", args.distill_steps)):
            if value:
                raise SctError(f"{flag} needs --calibrate PATH: recovery, distillation and statistics come from "
                               f"calibration text")
        for flag, value in (("--budget", args.budget), ("--profile", args.profile)):
            if value is not None:
                raise SctError(f"{flag} needs --calibrate PATH: a plain import holds one matrix at a time and has no "
                               f"activations to budget")
        return None
    steps = RecoveryConfig.steps if args.recover_steps is None else args.recover_steps
    if steps < 0:
        raise SctError(f"--recover-steps must be 0 or more, not {steps}")
    if args.recover_lr <= 0:
        raise SctError(f"--recover-lr must be positive, not {args.recover_lr}")
    if args.recover_tokens < 1:
        raise SctError(f"--recover-tokens must be at least 1, not {args.recover_tokens}")
    if args.distill_steps < 0:
        raise SctError(f"--distill-steps must be 0 or more, not {args.distill_steps}")
    if args.distill_lr <= 0:
        raise SctError(f"--distill-lr must be positive, not {args.distill_lr}")
    if args.distill_tokens < 1:
        raise SctError(f"--distill-tokens must be at least 1, not {args.distill_tokens}")
    distill = profile = None
    if args.distill_steps:
        distill = DistillConfig(steps=args.distill_steps, lr=args.distill_lr, batch_tokens=args.distill_tokens)
        # The engine pages the blocks under a profile, as `run` does: the given one, else run's default.
        profile = load_profile(args.profile or "steamdeck", args.budget)
    budget = None
    if args.budget is not None:
        budget = parse_size(args.budget, "--budget")
    elif args.profile is not None:
        budget = load_profile(args.profile).memory_budget
    return CalibrationConfig(
        budget=budget,
        paths=list(args.calibrate),
        tokens=args.calib_tokens,
        seq_len=args.calib_seq_len,
        sequential=args.statistics == "sequential",
        recovery=RecoveryConfig(steps=steps, lr=args.recover_lr, batch_tokens=args.recover_tokens) if steps else None,
        distill=distill,
        profile=profile,
    )


def run(args: argparse.Namespace) -> int:
    from sct_edge.convert.importer import ImportPolicy, import_model, open_source
    from sct_edge.engine.process import ProcessSettings, configure_process, signals_handled_by
    from sct_edge.engine.profile import parse_size

    if args.threads is not None and args.threads < 1:
        raise SctError(f"--threads must be at least 1, not {args.threads}")
    calibration = calibration_config(args)
    configure_process(ProcessSettings(threads=args.threads))  # torch's own thread count without --threads
    source = open_source(args.source)
    policy = ImportPolicy(
        rank=args.rank,
        energy=args.energy,
        full_rank=args.full_rank,
        dense=args.dense,
        params_ratio=args.params_ratio,
        size=None if args.size is None else parse_size(args.size, "--size"),
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

    def on_progress(phase: str, done: int, total: int) -> None:
        unit = "step" if phase == "distilling" else "block"
        b = bar(phase, total, unit=unit, desc=phase)
        b.update(done - b.n)
        b.set_postfix_str(f"{unit} {done} of {total}")

    def on_shard(name: str, done: int, total: int) -> None:
        b = bar("write", total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing")
        b.update(done - b.n)
        b.set_postfix_str(name)

    def on_block(row: dict) -> None:
        recovered = (f", after {row['steps']} recovery steps {row['error_after']:.4f}" if row.get("steps") else "")
        tqdm.write(f"block {row['block']}: output error {row['error_before']:.4f}{recovered}", file=sys.stderr)

    # SIGTERM (a service manager, `kill`, a batch scheduler's limit) unwinds like Ctrl-C, so the staging files
    # and a half-written store are removed on the way out instead of being left behind.
    try:
        with signals_handled_by(raise_terminated, (signal.SIGTERM,)):
            result = import_model(
                source,
                Path(args.store),
                policy,
                state_dtype=args.state_dtype,
                calibration=calibration,
                on_matrix=None if args.quiet else on_matrix,
                on_shard=None if args.quiet else on_shard,
                on_progress=None if args.quiet else on_progress,
                on_block=None if args.quiet else on_block,
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
    for note in result.notes:
        print(f"  note   {note}")
    if calibration is not None:
        method = "sequential" if calibration.sequential else "one-shot (dense statistics)"
        memory = result.calibration_memory
        if memory.get("budget") is not None:
            where = "spilled to disk" if memory["spilled"] else "in RAM"
            print(f"  memory budget {format_bytes(memory['budget'])}: estimate {format_bytes(memory['estimate'])}, "
                  f"activations {where}")
        print(f"  calibrated on {calibration.tokens:,} tokens of {', '.join(str(p) for p in calibration.paths)}, "
              f"{method}")
        before = [b["error_before"] for b in result.blocks]
        after = [b["error_after"] for b in result.blocks]
        if before:
            recovery = (f"; after {calibration.recovery.steps} recovery steps {min(after):.4f}-{max(after):.4f}"
                        if calibration.recovery is not None else "")
            print(f"  blocks output error (fraction of each block's update) {min(before):.4f}-{max(before):.4f}"
                  f"{recovery}")
        if result.distillation is not None:
            d = result.distillation
            print(f"  distilled {d['steps']} steps: KL divergence to the dense model {d['first_loss']:.4f} -> "
                  f"{d['last_loss']:.4f} nats a token, {d['seconds']:.1f} s")
    distilling = "" if result.distillation is None else f", {result.distillation['seconds']:.1f} s distilling"
    print(
        f"  time   {result.seconds:.1f} s ({result.convert_seconds:.1f} s reading and factoring, "
        f"{result.write_seconds:.1f} s writing the store{distilling}); peak RSS {format_bytes(peak)}"
    )
    print(f"  see `sct-edge inspect {result.store}` for every matrix's rank, kept energy and error")
    return 0
