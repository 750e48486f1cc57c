"""`sct-edge bench step`: measured training steps, streamed vs the in-memory reference."""

from __future__ import annotations

import argparse
import json
import shlex

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
    p.add_argument("--workload", choices=("seed", "lm"), default="seed",
                   help="seed: the seeds' 70B-class step (blocks only, o(q+k+v), loss = sum); lm: the real model")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=8, help="tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient-accumulation micro-batches per step")
    p.add_argument("--store", help="directory to create the benchmark's temporary store in (default: system temp)")
    p.add_argument("--threads", type=int, help="torch threads (default: the profile's)")
    p.add_argument("--engine", choices=("both", "streamed", "reference"), default="streamed",
                   help="streamed: sct-edge's engine in this process; reference: the in-memory step in this process; "
                        "both: each in its own child process, with ratios")
    p.add_argument("--cap", help="run the streamed child under a hard cgroup memory cap of this size "
                                 "(page cache charged; Linux cgroup v1, root); only with --engine both")
    p.add_argument("--json", action="store_true", help="print JSON lines only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sct_edge.engine.benchmark import BenchSpec, run_child, run_reference, run_streamed
    from sct_edge.engine.memory_cap import memory_cap

    if args.steps < 1:
        raise SctError("--steps must be at least 1")
    spec = BenchSpec(args.preset, args.rank, args.profile, args.budget, args.steps, args.workload, args.batch,
                     args.seq, args.micro_batches, args.store, args.threads)
    spec.config()  # bad presets and ranks fail here, before any child starts
    if args.engine != "both":
        if args.cap:
            raise SctError("--cap needs --engine both (the cap applies to a child process)")
        result = (run_streamed if args.engine == "streamed" else run_reference)(spec)
        print(json.dumps({"preset": spec.preset, "rank": spec.rank, "workload": spec.workload, **result}))
        return 0
    reference = run_child(spec, "reference", [])
    if args.cap:
        with memory_cap(args.cap) as cap:
            streamed = run_child(spec, "streamed", cap.prefix)
            streamed.update(cap.read_usage(), cap=args.cap)
    else:
        streamed = run_child(spec, "streamed", [])
    lines = [streamed, reference]
    if "error" not in streamed and "error" not in reference:
        ratio = {"step_s_ratio": streamed["step_s"] / reference["step_s"],
                 "peak_rss_ratio": streamed["peak_rss_bytes"] / reference["peak_rss_bytes"]}
        lines.append({"engine": "ratio", **ratio})
    for line in lines:
        print(json.dumps(line) if args.json else _human(line))
    if not args.json:
        print("command:", shlex.join(["sct-edge", "bench", "step", *_argv(args)]))
    return 0 if all("error" not in line for line in lines) else 1


def _human(line: dict) -> str:
    if line["engine"] == "ratio":
        return f"ratio       step time {line['step_s_ratio']:.3f}x   peak RSS {line['peak_rss_ratio']:.3f}x"
    if "error" in line:
        return f"{line['engine']:<11} failed: {line['error']}"
    phases = " ".join(f"{k} {v:.3f}" for k, v in line["phase_s"].items())
    return (f"{line['engine']:<11} step {line['step_s']:.3f} s (first {line['first_step_s']:.3f} s)  "
            f"peak RSS {line['peak_rss_bytes'] / 2**20:,.0f} MiB  read {line['bytes_read'] / 1e9:.2f} GB  "
            f"written {line['bytes_written'] / 1e9:.2f} GB  ortho {line['ortho_err']:.2e}  {phases}")


def _argv(args: argparse.Namespace) -> list[str]:
    out = []
    for key in ("preset", "rank", "profile", "budget", "steps", "workload", "batch", "seq", "micro_batches",
                "engine", "cap"):
        value = getattr(args, key)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out
