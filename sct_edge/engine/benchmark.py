"""`sct-edge bench step`: time training steps of the streamed engine and of the in-memory reference.

Each engine runs in its own child process, so each one's peak resident memory (the kernel's high-water
mark, VmHWM) is its own; the parent prints both JSON lines and their ratios from the same invocation.

Workloads: `hidden-sum` is the seeds' 70B-class step (decoder blocks only, additive attention o(q + k + v),
random hidden states of batch × seq, loss = their sum); `lm` is the real model on random tokens.

The model is a preset (a fresh store is created in a scratch directory) or an existing store, such as an
imported model, which is copied into the scratch directory first so the benchmark never changes it. Every
line reports the step's model FLOPs (`sct_edge.engine.flops`), the FLOP/s achieved and the MFU against the
GEMM peak in the profile's compute dtype, measured once at the start of the invocation. `plain` is a plain
PyTorch loop of the same model made dense (`sct_edge.engine.plain_loop`), for the ratios at real batch sizes.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sct_edge.engine.adamw import OptimConfig
from sct_edge.engine.flops import mfu, training_step_flops
from sct_edge.errors import SctError
from sct_edge.events import memory_snapshot
from sct_edge.model import fused
from sct_edge.model.config import ModelConfig, RankPolicy, get_preset
from sct_edge.model.products import uses_onednn
from sct_edge.model.retraction import PROFILER_LABEL


@dataclass
class BenchSpec:
    preset: str
    rank: int | None
    profile: str
    budget: str | None
    steps: int
    workload: str
    batch: int
    seq: int
    micro_batches: int
    store: str | None  # an existing store to benchmark (copied first), instead of the preset
    scratch: str | None  # where the temporary store goes (default: the system's temp directory)
    threads: int | None
    peak_flops: float | None = None  # the GEMM peak MFU is computed against, measured by the parent
    trace: str | None = None  # directory for a torch.profiler trace of the last step
    clip: float | None = None  # global gradient-norm clip, as `sct-edge run` applies by default (1.0)
    plain_dtype: str | None = None  # compute dtype of the plain loop (None: the profile's)
    # The CPU's own float32 GEMM peak (OpenBLAS), where torch's leaves part of the CPU unused; by the parent too
    cpu_peak_flops: float | None = None
    gemm: str = "auto"  # "torch": every product on torch's own BLAS, not oneDNN (`sct_edge/model/products.py`)

    def config(self) -> ModelConfig:
        if self.store is not None:
            from sct_edge.store.store import Store

            if self.rank is not None:
                raise SctError("--rank applies to presets; an existing store keeps its own ranks")
            config = Store.open(self.store).config
        else:
            config = get_preset(self.preset)
        if self.rank is not None:
            config = config.with_ranks(RankPolicy.uniform(self.rank))
        if self.workload == "hidden-sum":
            config.attention = "additive"
        config.validate()
        return config


def micro_batches(spec: BenchSpec, config: ModelConfig, step: int) -> list:
    g = torch.Generator().manual_seed(1000 + step)
    if spec.workload == "hidden-sum":
        return [(torch.randn(spec.batch, spec.seq, config.dim, generator=g), None) for _ in range(spec.micro_batches)]
    return [
        (torch.randint(0, config.vocab_size, (spec.batch, spec.seq), generator=g),
         torch.randint(0, config.vocab_size, (spec.batch, spec.seq), generator=g))
        for _ in range(spec.micro_batches)
    ]


@dataclass
class TimedSteps:
    """What `timed_steps` saw of each step: its wall time, the minor page faults the process took during it (the
    kernel zeroing and mapping fresh memory: allocator churn shows here) and the step function's result."""

    seconds: list[float]
    minor_faults: list[int]
    results: list


def summarise(spec: BenchSpec, config: ModelConfig, timed: TimedSteps, phases: list[dict], extra: dict) -> dict:
    step_times = timed.seconds
    steady = step_times[1:] or step_times
    keys = sorted({k for p in phases for k in p})
    steady_phases = phases[1:] or phases
    step_s = statistics.median(steady)
    flops = training_step_flops(config, spec.batch, spec.seq, spec.micro_batches, spec.workload)
    tokens = spec.batch * spec.seq * spec.micro_batches
    return {
        "step_s": step_s,
        "first_step_s": step_times[0],
        "steps": len(step_times),
        "phase_s": {k: statistics.median(p.get(k, 0.0) for p in steady_phases) for k in keys},
        "minor_faults": statistics.median(timed.minor_faults[1:] or timed.minor_faults),
        "peak_rss_bytes": memory_snapshot()["peak_rss_bytes"],
        "tokens_per_s": tokens / step_s,
        "model_flops": flops,
        "flops_per_s": flops / step_s,
        "gemm_peak_flops": spec.peak_flops,
        "mfu": None if spec.peak_flops is None else mfu(flops, step_s, spec.peak_flops),
        "cpu_gemm_peak_flops": spec.cpu_peak_flops,
        "mfu_cpu_peak": None if spec.cpu_peak_flops is None else mfu(flops, step_s, spec.cpu_peak_flops),
        "threads": torch.get_num_threads(),
        "gemm": "onednn" if uses_onednn() else "torch",
        # SwiGLU's sliced element-wise passes: compiled and fused, or torch's ops (`sct_edge/model/fused.py`)
        "element_wise": "fused" if fused.available() else "torch",
        **extra,
    }


def timed_steps(spec: BenchSpec, config: ModelConfig, engine: str, step_fn) -> TimedSteps:
    """Run `step_fn(batches, step)` for each step; the last one under torch.profiler when `spec.trace` is set."""
    timed = TimedSteps([], [], [])
    for step in range(1, spec.steps + 1):
        batches = micro_batches(spec, config, step)
        traced = spec.trace is not None and step == spec.steps
        profiler = torch.profiler.profile(record_shapes=True) if traced else None
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        if profiler is not None:
            with profiler:
                timed.results.append(step_fn(batches, step))
        else:
            timed.results.append(step_fn(batches, step))
        timed.seconds.append(time.perf_counter() - t0)
        timed.minor_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        if profiler is not None:
            write_trace(profiler, Path(spec.trace), engine)
    return timed


# What a step's time goes to, by the op names torch.profiler reports (self CPU time); first match wins.
OP_KINDS = (
    ("attention", ("scaled_dot_product", "_efficient_attention", "_flash_attention")),
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "mkldnn::_linear_pointwise")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("retraction", (PROFILER_LABEL, "linalg_", "cholesky", "triangular")),
    ("optimizer", ("adamw", "_foreach_", "lerp", "addcdiv", "addcmul")),
    ("element-wise", ("aten::",)),
)


def time_by_kind(averages) -> dict[str, float]:
    """Self CPU seconds of a profile's ops grouped into OP_KINDS ("other": autograd and Python bookkeeping)."""
    seconds: dict[str, float] = {kind: 0.0 for kind, _ in OP_KINDS} | {"other": 0.0}
    for event in averages:
        kind = next((k for k, names in OP_KINDS if any(n in event.key for n in names)), "other")
        seconds[kind] += event.self_cpu_time_total / 1e6
    return seconds


def write_trace(profiler, directory: Path, engine: str) -> None:
    """The chrome trace (`ENGINE.trace.json`), the top ops by self CPU time (`ENGINE.top.txt`) and the time by
    kind of op (`ENGINE.kinds.json`: GEMM, attention, element-wise, loss, retraction, optimizer, other)."""
    directory.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(directory / f"{engine}.trace.json"))
    averages = profiler.key_averages()
    (directory / f"{engine}.kinds.json").write_text(json.dumps(time_by_kind(averages), indent=1) + "\n")
    table = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    by_shape = profiler.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60, max_shapes_column_width=80)
    (directory / f"{engine}.top.txt").write_text(table + "\n\nby input shape:\n" + by_shape)


def run_streamed(spec: BenchSpec) -> dict:
    from sct_edge.engine.plan import make_plan
    from sct_edge.engine.process import ProcessSettings, configure_process
    from sct_edge.engine.profile import load_profile, resolve_device
    from sct_edge.engine.step import Engine
    from sct_edge.store.store import Store

    profile = load_profile(spec.profile, spec.budget)
    config = spec.config()
    with tempfile.TemporaryDirectory(dir=spec.scratch) as tmp:
        started = time.perf_counter()
        if spec.store is not None:
            # The benchmark's steps update the weights: they run on a copy, the original stays as it is.
            shutil.copytree(spec.store, Path(tmp) / "store")
            store = Store.open(Path(tmp) / "store")
        else:
            store = Store.create(Path(tmp) / "store", config, seed=0, state_dtype=getattr(torch, profile.state_dtype))
        create_s = time.perf_counter() - started
        plan = make_plan(config, profile, spec.batch, spec.seq, spec.micro_batches, spec.workload,
                         clip=spec.clip is not None)
        configure_process(ProcessSettings(threads=plan.compute_threads(torch.get_num_threads()), malloc=plan.malloc))
        engine = Engine(store, plan, OptimConfig(max_grad_norm=spec.clip), resolve_device(profile))
        timed = timed_steps(spec, config, "streamed", engine.train_step)
        engine.close()
        phases = [r.phase_s for r in timed.results]
        reads = [r.bytes_read for r in timed.results]
        writes = [r.bytes_written for r in timed.results]
        ortho = timed.results[-1].ortho_err
        return summarise(spec, config, timed, phases, {
            "engine": "streamed", "bytes_read": statistics.median(reads[1:] or reads),
            "bytes_written": statistics.median(writes[1:] or writes), "ortho_err": ortho,
            "resident_blocks": plan.resident_blocks, "n_blocks": config.n_layers,
            "predicted_peak_bytes": plan.predicted_peak_bytes, "store_create_s": create_s,
            "budget_bytes": profile.memory_budget, "holds_gradients": plan.holds_gradients,
            "compute_dtype": profile.compute_dtype,
        })


def run_reference(spec: BenchSpec) -> dict:
    from sct_edge.engine.profile import load_profile
    from sct_edge.engine.reference import InMemoryStep
    from sct_edge.model.retraction import orthonormality_error
    from sct_edge.model.transformer import Transformer

    config = spec.config()
    model = Transformer(config)
    compute_dtype = load_profile(spec.profile, spec.budget).compute_dtype
    step_engine = InMemoryStep(model, OptimConfig(max_grad_norm=spec.clip), workload=spec.workload,
                               compute_dtype=compute_dtype)
    timed = timed_steps(spec, config, "reference", lambda batches, step: step_engine.step(batches))
    factors = [p.detach() for n, p in model.named_parameters() if n.endswith((".U", ".V"))]
    ortho = max((orthonormality_error(f) for f in factors), default=0.0)
    return summarise(spec, config, timed, [{}] * len(timed.seconds), {"engine": "reference", "bytes_read": 0,
                     "bytes_written": 0, "ortho_err": ortho, "compute_dtype": compute_dtype})


def run_plain(spec: BenchSpec) -> dict:
    from sct_edge.engine.plain_loop import PlainLoop
    from sct_edge.engine.profile import load_profile
    from sct_edge.model.transformer import dense_config

    if spec.workload != "lm":
        raise SctError("the plain loop runs the real model: it needs --workload lm")
    config = dense_config(spec.config())
    compute_dtype = spec.plain_dtype or load_profile(spec.profile, spec.budget).compute_dtype
    loop = PlainLoop(config, clip=spec.clip, compute_dtype=compute_dtype)
    timed = timed_steps(spec, config, "plain", lambda batches, step: loop.step(batches))
    return summarise(spec, config, timed, [{}] * len(timed.seconds), {"engine": "plain", "bytes_read": 0,
                     "bytes_written": 0, "ortho_err": 0.0, "compute_dtype": compute_dtype, "gemm": "torch",
                     "element_wise": "torch"})


def child_command(spec: BenchSpec, engine: str) -> list[str]:
    cmd = [sys.executable, "-m", "sct_edge", "bench", "step", "--engine", engine, "--json",
           "--preset", spec.preset, "--profile", spec.profile, "--steps", str(spec.steps),
           "--workload", spec.workload, "--batch", str(spec.batch), "--seq", str(spec.seq),
           "--micro-batches", str(spec.micro_batches)]
    for flag, value in (("--rank", spec.rank), ("--budget", spec.budget), ("--store", spec.store),
                        ("--scratch", spec.scratch), ("--threads", spec.threads), ("--peak-flops", spec.peak_flops),
                        ("--cpu-peak-flops", spec.cpu_peak_flops), ("--trace", spec.trace), ("--clip", spec.clip),
                        ("--plain-dtype", spec.plain_dtype), ("--gemm", spec.gemm)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def run_child(spec: BenchSpec, engine: str, wrapper: list[str]) -> dict:
    """Run one engine's benchmark in a child process (behind `wrapper`, e.g. a memory cap); its JSON line, or
    an error entry. The child's temporary store lives in a directory this process removes, so a child killed
    outright (the OOM killer under `--cap`) leaves no store behind."""
    with tempfile.TemporaryDirectory(dir=spec.scratch, prefix="sct-edge-bench-") as scratch:
        completed = subprocess.run(wrapper + child_command(replace(spec, scratch=scratch), engine),
                                   capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"engine": engine, "error": f"exit {completed.returncode}: {tail[0]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])
