"""`sct-edge bench step`: measured training steps, streamed vs the in-memory reference and a plain loop, with MFU."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from sct_edge.commands.former_names import workload_argument
from sct_edge.engine.plan import WORKLOADS
from sct_edge.errors import SctError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (timings go to docs/benchmarks.md, not to unit tests)")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = benches.add_parser("step", help="time training steps of the streamed engine (and the in-memory reference)")
    p.add_argument("--preset", default="sct-70b", help="model preset")
    p.add_argument("--rank", type=int, help="rank of every spectral component (default: the preset's)")
    p.add_argument("--profile", default="steamdeck", help="profile name or TOML path")
    p.add_argument("--budget", help="override the profile's memory budget, e.g. 1GiB")
    p.add_argument("--steps", type=int, default=4, help="steps to time; step_s is the median of all but the first")
    p.add_argument("--workload", type=workload_argument, choices=WORKLOADS, default="hidden-sum",
                   help="hidden-sum: the seeds' 70B-class step (decoder blocks only, additive attention o(q+k+v), "
                        "random hidden states in, loss = their sum; formerly 'seed'); lm: the real model")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=8, help="tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient-accumulation micro-batches per step")
    p.add_argument("--store", help="an existing store (an imported model, say) to benchmark as it is instead of a "
                                   "preset; the steps run on a copy in the scratch directory, the store is not changed")
    p.add_argument("--scratch", help="directory to create the benchmark's temporary store in (default: system temp)")
    p.add_argument("--threads", type=int, help="torch threads (default: the profile's)")
    p.add_argument("--engine", choices=("both", "all", "streamed", "reference", "plain"), default="streamed",
                   help="streamed: sct-edge's engine in this process; reference: the in-memory spectral step; plain: a "
                        "plain PyTorch loop of the model made dense (--workload lm); both: streamed and reference, "
                        "all: the three, each in its own child process, with ratios")
    p.add_argument("--peak-flops", type=float,
                   help="GEMM peak (FLOP/s) to compute MFU against (default: measured at the start of the run, in the "
                        "profile's compute dtype, with the library the step's products use: oneDNN under --gemm auto "
                        "on a CPU with AVX-512, torch's otherwise)")
    p.add_argument("--cpu-peak-flops", type=float,
                   help="the CPU's own float32 GEMM peak (FLOP/s) for a second MFU, mfu_cpu_peak (default: measured "
                        "at the start with OpenBLAS, which uses AVX-512 where torch's MKL does not; float32 only)")
    p.add_argument("--trace", help="directory for a torch.profiler trace of each engine's last step "
                                   "(ENGINE.trace.json for chrome://tracing, ENGINE.top.txt: the top ops, "
                                   "ENGINE.kinds.json: seconds by kind of op)")
    p.add_argument("--cap", help="run the streamed child under a hard cgroup memory cap of this size "
                                 "(page cache charged; Linux cgroup v1, root); with --engine streamed, both or all")
    p.add_argument("--clip", type=float, help="clip the global gradient norm at this value, as `sct-edge run` does "
                                              "by default (1.0); default: no clipping")
    p.add_argument("--plain-dtype", choices=("float32", "bfloat16"),
                   help="compute dtype of the plain loop (default: the profile's compute_dtype); float32 is the loop "
                        "as one writes it first")
    p.add_argument("--gemm", choices=("auto", "torch"), default="auto",
                   help="the streamed and reference steps' float32 products: auto (oneDNN on CPUs with AVX-512, where "
                        "it beats torch's BLAS) or torch (torch's own BLAS, for comparison); the plain loop always "
                        "uses torch's")
    p.add_argument("--json", action="store_true", help="print JSON lines only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sct_edge.engine.benchmark import BenchSpec, run_child, run_plain, run_reference, run_streamed
    from sct_edge.engine.flops import gemm_peak, step_library
    from sct_edge.engine.memory_cap import memory_cap
    from sct_edge.engine.process import ProcessSettings, configure_process
    from sct_edge.engine.profile import load_profile

    for flag, value in (("--steps", args.steps), ("--batch", args.batch), ("--seq", args.seq),
                        ("--micro-batches", args.micro_batches), ("--threads", args.threads or 1)):
        if value < 1:
            raise SctError(f"{flag} must be at least 1, not {value}")
    for flag, value in (("--clip", args.clip), ("--peak-flops", args.peak_flops),
                        ("--cpu-peak-flops", args.cpu_peak_flops)):
        if value is not None and not value > 0:
            raise SctError(f"{flag} must be more than 0, not {value}")
    if args.engine in ("all", "plain") and args.workload != "lm":
        raise SctError("the plain loop runs the real model: --engine all/plain needs --workload lm")
    if args.store is not None and args.rank is not None:
        raise SctError("--rank applies to presets; an existing store keeps its own ranks")
    if args.scratch is not None and not Path(args.scratch).is_dir():
        raise SctError(f"--scratch {args.scratch}: not an existing directory")
    profile = load_profile(args.profile, args.budget)  # a bad profile or budget fails here, before any child
    configure_process(ProcessSettings(onednn=args.gemm == "auto"))  # the route the GEMM peak is measured on
    spec = BenchSpec(args.preset, args.rank, args.profile, args.budget, args.steps, args.workload, args.batch,
                     args.seq, args.micro_batches, args.store, args.scratch, args.threads, args.peak_flops, args.trace,
                     args.clip, args.plain_dtype, gemm=args.gemm)
    spec.config()  # bad presets, ranks and stores fail here, before any child starts
    threads = args.threads or profile.usable_threads()
    if spec.peak_flops is None:
        spec.peak_flops = gemm_peak(threads, dtype=profile.compute_dtype).flops_per_s
    spec.cpu_peak_flops = args.cpu_peak_flops
    if spec.cpu_peak_flops is None and profile.compute_dtype == "float32":
        spec.cpu_peak_flops = gemm_peak(threads, library="openblas").flops_per_s
    runners = {"streamed": run_streamed, "reference": run_reference, "plain": run_plain}
    if args.cap and args.engine in ("reference", "plain"):
        raise SctError("--cap applies to the streamed engine: use --engine streamed, both or all")
    if args.engine in runners and not args.cap:
        # The in-memory baselines run as a plain PyTorch program would: torch's and glibc's own settings.
        configure_process(ProcessSettings.for_profile(profile, args.threads) if args.engine == "streamed"
                          else ProcessSettings(threads=args.threads))  # the products' route is set above
        result = runners[args.engine](spec)
        print(json.dumps({"preset": None if spec.store else spec.preset, "store": spec.store, "rank": spec.rank,
                          "workload": spec.workload, "batch": spec.batch, "seq": spec.seq, **result}))
        return 0
    # --engine streamed with --cap: the streamed child alone, under the cap (no in-memory baseline to compare).
    lines = [] if args.engine == "streamed" else [run_child(spec, "reference", [])]
    if args.engine == "all":
        lines.append(run_child(spec, "plain", []))
    if args.cap:
        with memory_cap(args.cap) as cap:
            streamed = run_child(spec, "streamed", cap.prefix)
            streamed.update(cap.read_usage(), cap=args.cap)
    else:
        streamed = run_child(spec, "streamed", [])
    lines.insert(0, streamed)
    by_engine = {line["engine"]: line for line in lines if "error" not in line}
    for numerator, denominator in (("streamed", "reference"), ("streamed", "plain"), ("reference", "plain")):
        if numerator in by_engine and denominator in by_engine:
            a, b = by_engine[numerator], by_engine[denominator]
            lines.append({"engine": "ratio", "of": f"{numerator}/{denominator}",
                          "step_s_ratio": a["step_s"] / b["step_s"],
                          "peak_rss_ratio": a["peak_rss_bytes"] / b["peak_rss_bytes"]})
    for line in lines:
        print(json.dumps(line) if args.json else _human(line))
    if not args.json:
        how = "given" if args.peak_flops else (f"{profile.compute_dtype} square products with "
                                               f"{step_library(profile.compute_dtype)}, measured at the start")
        print(f"GEMM peak   {spec.peak_flops / 1e9:.1f} GFLOP/s ({how})")
        if spec.cpu_peak_flops is not None:
            how = "given" if args.cpu_peak_flops else "float32 square products with OpenBLAS, measured at the start"
            print(f"CPU's peak  {spec.cpu_peak_flops / 1e9:.1f} GFLOP/s ({how})")
        print("command:", shlex.join(["sct-edge", "bench", "step", *_argv(args)]))
    return 0 if all("error" not in line for line in lines) else 1


def _human(line: dict) -> str:
    if line["engine"] == "ratio":
        return (f"ratio       {line['of']:<18} step time {line['step_s_ratio']:.3f}x   "
                f"peak RSS {line['peak_rss_ratio']:.3f}x")
    if "error" in line:
        return f"{line['engine']:<11} failed: {line['error']}"
    phases = " ".join(f"{k} {v:.3f}" for k, v in line["phase_s"].items())
    mfu = "" if line.get("mfu") is None else f"  MFU {line['mfu']:.1%}"
    if line.get("mfu_cpu_peak") is not None:
        mfu += f" ({line['mfu_cpu_peak']:.1%} of the CPU's)"
    return (f"{line['engine']:<11} step {line['step_s']:.3f} s (first {line['first_step_s']:.3f} s)  "
            f"{line['tokens_per_s']:,.1f} tok/s  {line['flops_per_s'] / 1e9:.1f} GFLOP/s{mfu}  "
            f"peak RSS {line['peak_rss_bytes'] / 2**20:,.0f} MiB  read {line['bytes_read'] / 1e9:.2f} GB  "
            f"written {line['bytes_written'] / 1e9:.2f} GB  minor faults {line['minor_faults']:,.0f}  "
            f"ortho {line['ortho_err']:.2e}  products {line['gemm']}  element-wise {line['element_wise']}  "
            f"{phases}")


def _argv(args: argparse.Namespace) -> list[str]:
    out = []
    for key in ("preset", "store", "rank", "profile", "budget", "steps", "workload", "batch", "seq", "micro_batches",
                "threads", "engine", "cap", "clip", "plain_dtype", "gemm"):
        value = getattr(args, key)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out
