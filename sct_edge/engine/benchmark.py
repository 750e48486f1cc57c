"""`sct-edge bench step`: time training steps of the streamed engine and of the in-memory reference.

Each engine runs in its own child process, so each one's peak resident memory (the kernel's high-water
mark, VmHWM) is its own; the parent prints both JSON lines and their ratios from the same invocation.

Workloads: `seed` is the seeds' 70B-class step (decoder blocks only, attention simplified to o(q + k + v),
random hidden states of batch × seq, loss = their sum); `lm` is the real model on random tokens.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sct_edge.engine.adamw import OptimConfig
from sct_edge.events import memory_snapshot
from sct_edge.model.config import ModelConfig, RankPolicy, get_preset


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
    store: str | None
    threads: int | None

    def config(self) -> ModelConfig:
        config = get_preset(self.preset)
        if self.rank is not None:
            config = config.with_ranks(RankPolicy.uniform(self.rank))
        if self.workload == "seed":
            config.attention = "seed"
        config.validate()
        return config


def micro_batches(spec: BenchSpec, config: ModelConfig, step: int) -> list:
    g = torch.Generator().manual_seed(1000 + step)
    if spec.workload == "seed":
        return [(torch.randn(spec.batch, spec.seq, config.dim, generator=g), None) for _ in range(spec.micro_batches)]
    return [
        (torch.randint(0, config.vocab_size, (spec.batch, spec.seq), generator=g),
         torch.randint(0, config.vocab_size, (spec.batch, spec.seq), generator=g))
        for _ in range(spec.micro_batches)
    ]


def summarise(step_times: list[float], phases: list[dict], extra: dict) -> dict:
    steady = step_times[1:] or step_times
    keys = sorted({k for p in phases for k in p})
    steady_phases = phases[1:] or phases
    return {
        "step_s": statistics.median(steady),
        "first_step_s": step_times[0],
        "steps": len(step_times),
        "phase_s": {k: statistics.median(p.get(k, 0.0) for p in steady_phases) for k in keys},
        "peak_rss_bytes": memory_snapshot()["peak_rss_bytes"],
        **extra,
    }


def run_streamed(spec: BenchSpec) -> dict:
    from sct_edge.engine.plan import make_plan
    from sct_edge.engine.profile import load_profile, resolve_device
    from sct_edge.engine.step import Engine
    from sct_edge.store.store import Store

    profile = load_profile(spec.profile, spec.budget)
    torch.set_num_threads(spec.threads or profile.usable_threads())
    config = spec.config()
    with tempfile.TemporaryDirectory(dir=spec.store) as tmp:
        started = time.perf_counter()
        store = Store.create(Path(tmp) / "store", config, seed=0, state_dtype=getattr(torch, profile.state_dtype))
        create_s = time.perf_counter() - started
        plan = make_plan(config, profile, spec.batch, spec.seq, spec.micro_batches, spec.workload)
        engine = Engine(store, plan, OptimConfig(), resolve_device(profile))
        times, phases, reads, writes = [], [], [], []
        ortho = 0.0
        for step in range(1, spec.steps + 1):
            batches = micro_batches(spec, config, step)
            t0 = time.perf_counter()
            result = engine.train_step(batches, step)
            times.append(time.perf_counter() - t0)
            phases.append(result.phase_s)
            reads.append(result.bytes_read)
            writes.append(result.bytes_written)
            ortho = result.ortho_err
        engine.close()
        return summarise(times, phases, {
            "engine": "streamed", "bytes_read": statistics.median(reads[1:] or reads),
            "bytes_written": statistics.median(writes[1:] or writes), "ortho_err": ortho,
            "resident_blocks": plan.resident_blocks, "n_blocks": config.n_layers,
            "predicted_peak_bytes": plan.predicted_peak_bytes, "store_create_s": create_s,
            "budget_bytes": profile.memory_budget,
        })


def run_reference(spec: BenchSpec) -> dict:
    from sct_edge.engine.reference import InMemoryStep
    from sct_edge.model.retraction import orthonormality_error
    from sct_edge.model.transformer import Transformer

    torch.set_num_threads(spec.threads or torch.get_num_threads())
    config = spec.config()
    model = Transformer(config)
    step_engine = InMemoryStep(model, OptimConfig(), workload=spec.workload)
    times, phases = [], []
    for step in range(1, spec.steps + 1):
        batches = micro_batches(spec, config, step)
        t0 = time.perf_counter()
        step_engine.step(batches)
        times.append(time.perf_counter() - t0)
        phases.append({})
    ortho = max(orthonormality_error(p.detach()) for n, p in model.named_parameters() if n.endswith((".U", ".V")))
    return summarise(times, phases, {"engine": "reference", "bytes_read": 0, "bytes_written": 0, "ortho_err": ortho})


def child_command(spec: BenchSpec, engine: str) -> list[str]:
    cmd = [sys.executable, "-m", "sct_edge", "bench", "step", "--engine", engine, "--json",
           "--preset", spec.preset, "--profile", spec.profile, "--steps", str(spec.steps),
           "--workload", spec.workload, "--batch", str(spec.batch), "--seq", str(spec.seq),
           "--micro-batches", str(spec.micro_batches)]
    for flag, value in (("--rank", spec.rank), ("--budget", spec.budget), ("--store", spec.store),
                        ("--threads", spec.threads)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def run_child(spec: BenchSpec, engine: str, wrapper: list[str]) -> dict:
    completed = subprocess.run(wrapper + child_command(spec, engine), capture_output=True, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"engine": engine, "error": f"exit {completed.returncode}: {tail[0]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])
