"""`sct-edge bench step` and its FLOP accounting: model FLOPs by hand, MFU fields, existing stores, bad input.

No timing claims: these run one or two steps of the tiny preset and check what is reported, not how fast.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sct_edge.cli import main
from sct_edge.engine import plan as plan_module
from sct_edge.engine.benchmark import BenchSpec, time_by_kind, timed_steps
from sct_edge.engine.flops import attention_flops, forward_flops_per_sequence, gemm_peak, mfu, training_step_flops
from sct_edge.engine.malloc import NO_TRIM, MallocThresholds
from sct_edge.engine.memory_cap import cgroup_available
from sct_edge.engine.process import current_process_settings
from sct_edge.model import fused
from sct_edge.model.accounting import CHUNK_LOGIT_BYTES
from sct_edge.model.config import RankPolicy, get_preset
from sct_edge.model.retraction import retract_
from sct_edge.model.transformer import dense_config
from sct_edge.store.store import MANIFEST, Store


def test_forward_flops_of_a_dense_model_are_twice_its_matrix_parameters_plus_attention():
    config = dense_config(get_preset("smollm2-135m"))
    d, kv, f, vocab, seq = config.dim, config.kv_dim, config.ffn_dim, config.vocab_size, 256
    per_block = 2 * (d * d * 2 + d * kv * 2 + 3 * d * f)
    # Causal: position t sees t + 1 keys; Q Kᵀ and A V are 2·d_head FLOPs per head and key each.
    attention = 4 * config.n_heads * config.head_dim * sum(t + 1 for t in range(seq))
    head = 2 * d * vocab  # tied: the lookup is free, the head is one dense product
    expected = config.n_layers * (seq * per_block + attention) + seq * head
    assert forward_flops_per_sequence(config, seq) == expected
    assert training_step_flops(config, 4, seq, micro_batches=2) == 3 * 8 * expected


def test_spectral_flops_count_the_three_products_and_the_embedding_projection():
    config = get_preset("tiny").with_ranks(RankPolicy.uniform(8))
    d, kv, f, vocab = config.dim, config.kv_dim, config.ffn_dim, config.vocab_size
    per_block = 2 * 8 * ((d + d) * 2 + (d + kv) * 2 + 3 * (d + f))
    expected = config.n_layers * (per_block + attention_flops(config, 1)) + 2 * 8 * d + 2 * 8 * (d + vocab)
    assert forward_flops_per_sequence(config, 1) == expected


def test_the_hidden_sum_workload_counts_blocks_only():
    config = get_preset("sct-70b")
    config.attention = "additive"
    d, f = config.dim, config.ffn_dim
    assert attention_flops(config, 8) == 0
    assert training_step_flops(config, 1, 8, workload="hidden-sum") == 3 * 8 * 80 * 2 * 32 * (4 * 2 * d + 3 * (d + f))


def test_gemm_peak_measures_every_size_and_restores_the_thread_count():
    import torch

    before = torch.get_num_threads()
    peak = gemm_peak(threads=1, sizes=(64, 128), repeats=2)
    assert set(peak.per_size) == {64, 128} and peak.flops_per_s == max(peak.per_size.values()) > 0
    assert peak.threads == 1 and torch.get_num_threads() == before
    assert peak.dtype == "float32" and peak.to_json()["gemm_peak_dtype"] == "float32"
    bf16 = gemm_peak(threads=1, sizes=(64,), repeats=1, dtype="bfloat16")
    assert bf16.dtype == "bfloat16" and bf16.flops_per_s > 0 and bf16.library == "torch"
    with pytest.raises(ValueError, match="library is one of"):
        gemm_peak(threads=1, sizes=(64,), library="mkl")


def test_the_gemm_peak_is_measured_on_the_library_of_the_steps_products():
    """MFU holds the step's FLOP/s against what its own products reach: oneDNN's peak where they are routed
    there, torch's where not (a peak of torch's under oneDNN's products reported MFU above 100 %)."""
    from sct_edge.model import products

    products.use_onednn(True)
    routed = "onednn" if products.onednn_available() else "torch"
    assert gemm_peak(threads=1, sizes=(64,), repeats=1).library == routed
    assert gemm_peak(threads=1, sizes=(64,), repeats=1, dtype="bfloat16").library == "torch"
    with products.torch_products():
        assert gemm_peak(threads=1, sizes=(64,), repeats=1).library == "torch"
    assert mfu(10**9, 2.0, 10**9) == 0.5


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sct_edge", "bench", "step", *args],
                          capture_output=True, text=True, timeout=600)


def bench_here(capsys, *args: str) -> tuple[int, str, str]:
    """`sct-edge bench step ARGS` in this process (single-engine runs start no child): rc, stdout, stderr."""
    rc = main(["bench", "step", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_missing_store_is_a_one_line_error(tmp_path, capsys):
    rc, _, err = bench_here(capsys, "--store", str(tmp_path / "nope"), "--workload", "lm", "--peak-flops", "1e9")
    assert rc == 2
    assert err.strip().splitlines() == [f"sct-edge: error: store {tmp_path / 'nope'} does not exist"]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch must be at least 1"),
    (["--engine", "plain"], "--workload lm"),
    (["--scratch", "/nonexistent-dir"], "not an existing directory"),
    (["--workload", "lm", "--engine", "reference", "--cap", "1GiB"], "--cap applies to the streamed engine"),
    (["--clip", "0"], "--clip must be more than 0"),
    (["--peak-flops", "0"], "--peak-flops must be more than 0"),
    (["--cpu-peak-flops", "-1"], "--cpu-peak-flops must be more than 0"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    rc, _, err = bench_here(capsys, "--preset", "tiny", "--peak-flops", "1e9", *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_an_existing_store_is_benchmarked_on_a_copy_and_reports_mfu(tmp_path, capsys):
    config = get_preset("tiny")
    Store.create(tmp_path / "store", config, seed=5)
    manifest = (tmp_path / "store" / MANIFEST).read_bytes()
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").iterdir()}
    rc, out, err = bench_here(capsys, "--store", str(tmp_path / "store"), "--workload", "lm", "--batch", "2", "--seq",
                              "16", "--steps", "1", "--profile", "ci", "--engine", "streamed", "--peak-flops", "1e9",
                              "--scratch", str(tmp_path))
    assert rc == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["store"] == str(tmp_path / "store") and line["engine"] == "streamed"
    assert line["model_flops"] == training_step_flops(config, 2, 16)
    assert line["mfu"] == pytest.approx(line["model_flops"] / line["step_s"] / 1e9)
    # Not given: the CPU's own float32 peak, measured with OpenBLAS, is the second MFU's denominator.
    assert line["cpu_gemm_peak_flops"] > 0
    assert line["mfu_cpu_peak"] == pytest.approx(line["model_flops"] / line["step_s"] / line["cpu_gemm_peak_flops"])
    assert line["tokens_per_s"] == pytest.approx(32 / line["step_s"])
    assert line["minor_faults"] >= 0
    # The steps ran on a copy: the store's files are exactly as they were, and no scratch copy is left.
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").iterdir()} == files
    assert (tmp_path / "store" / MANIFEST).read_bytes() == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_the_streamed_step_runs_under_the_malloc_thresholds_its_plan_chose(tmp_path, capsys, monkeypatch):
    """The plan's heap threshold reaches the process: with the default lowered to 1 KiB, the tiny model's
    hidden states count as large, and the plan lifts the threshold for the step to twice the larger of their
    size and a loss chunk's logits, and never trims the heap."""
    monkeypatch.setattr(plan_module, "STEP_MALLOC", MallocThresholds(mmap_bytes=1024, trim_bytes=64 << 20))
    rc, _, err = bench_here(capsys, "--preset", "tiny", "--workload", "lm", "--batch", "2", "--seq", "16", "--steps",
                            "1", "--profile", "ci", "--engine", "streamed", "--peak-flops", "1e9", "--scratch",
                            str(tmp_path))
    assert rc == 0, err
    hidden = 2 * 16 * get_preset("tiny").dim * 4
    assert current_process_settings().malloc == MallocThresholds(
        mmap_bytes=2 * max(hidden, CHUNK_LOGIT_BYTES), trim_bytes=NO_TRIM)


def test_all_engines_report_ratios_to_the_plain_loop(tmp_path):
    done = bench("--preset", "tiny", "--workload", "lm", "--batch", "1", "--seq", "8", "--steps", "1", "--profile",
                 "ci", "--engine", "all", "--json", "--peak-flops", "1e9", "--cpu-peak-flops", "2e9",
                 "--trace", str(tmp_path / "trace"),
                 "--clip", "0.5", "--plain-dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.strip().splitlines()]
    assert [x["engine"] for x in lines] == ["streamed", "reference", "plain", "ratio", "ratio", "ratio"]
    # The children got the clip (every block fits, so the streamed step holds its gradients) and the dtypes.
    assert lines[0]["holds_gradients"] is True
    assert [x["compute_dtype"] for x in lines[:3]] == ["float32", "float32", "bfloat16"]
    assert [x["of"] for x in lines[3:]] == ["streamed/reference", "streamed/plain", "reference/plain"]
    assert all(x["mfu"] > 0 and x["gemm_peak_flops"] == 1e9 and x["cpu_gemm_peak_flops"] == 2e9 for x in lines[:3])
    assert all(x["mfu_cpu_peak"] == pytest.approx(x["mfu"] / 2) for x in lines[:3])
    assert lines[2]["model_flops"] == training_step_flops(dense_config(get_preset("tiny")), 1, 8)
    # which element-wise route the step's sliced MLP takes; the plain loop is torch's alone
    expected_route = "fused" if fused.available() else "torch"
    assert [x["element_wise"] for x in lines[:3]] == [expected_route, expected_route, "torch"]
    for engine in ("streamed", "reference", "plain"):
        assert "aten::mm" in (tmp_path / "trace" / f"{engine}.top.txt").read_text()
        assert (tmp_path / "trace" / f"{engine}.trace.json").stat().st_size > 0
        assert json.loads((tmp_path / "trace" / f"{engine}.kinds.json").read_text())["GEMM"] > 0


@pytest.mark.skipif(not cgroup_available(), reason="needs a writable cgroup v1 memory controller (root)")
def test_the_streamed_engine_alone_runs_under_a_cap(tmp_path):
    done = bench("--preset", "tiny", "--workload", "lm", "--batch", "1", "--seq", "8", "--steps", "1", "--profile",
                 "ci", "--engine", "streamed", "--cap", "2GiB", "--json", "--peak-flops", "1e9",
                 "--scratch", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(x) for x in done.stdout.strip().splitlines()]
    assert line["engine"] == "streamed" and line["cap"] == "2GiB"
    assert 0 < line["cgroup_max_usage_in_bytes"] <= 2 * 2**30 == line["cgroup_limit_in_bytes"]


def test_a_profile_is_summed_by_kind_of_op():
    a = torch.randn(64, 64)
    with torch.profiler.profile() as profiler:
        logits = (a @ a) * 2.0
        F.cross_entropy(logits, torch.zeros(64, dtype=torch.long))
        torch.linalg.cholesky(a @ a.T + 64 * torch.eye(64))
    with torch.profiler.profile() as retracting:
        retract_([torch.randn(4096, 64)])  # OpenBLAS, not torch ops: seen only through its recorded range
    kinds = time_by_kind(profiler.key_averages())
    assert time_by_kind(retracting.key_averages())["retraction"] > 0
    assert set(kinds) == {"attention", "GEMM", "loss", "retraction", "optimizer", "element-wise", "other"}
    assert kinds["GEMM"] > 0 and kinds["loss"] > 0 and kinds["retraction"] > 0 and kinds["element-wise"] > 0
    assert kinds["attention"] == kinds["optimizer"] == 0
    total = sum(e.self_cpu_time_total for e in profiler.key_averages()) / 1e6
    assert sum(kinds.values()) == pytest.approx(total)


def test_a_child_killed_outright_leaves_no_store_behind(tmp_path):
    """The OOM killer under --cap sends SIGKILL: the child cannot clean up, so the parent owns its scratch."""
    from sct_edge.engine.benchmark import BenchSpec, run_child

    killer = ("import os, pathlib, sys; args = sys.argv; scratch = args[args.index('--scratch') + 1]; "
              "pathlib.Path(scratch, 'store').mkdir(); os.kill(os.getpid(), 9)")
    spec = BenchSpec(preset="tiny", rank=None, profile="ci", budget=None, steps=2, workload="lm", batch=1, seq=8,
                     micro_batches=1, store=None, scratch=str(tmp_path), threads=1, peak_flops=None, trace=None,
                     clip=None, plain_dtype=None)
    result = run_child(spec, "streamed", [sys.executable, "-c", killer])
    assert result == {"engine": "streamed", "error": "exit -9: (no output)"}
    assert list(tmp_path.iterdir()) == []


def test_timed_steps_counts_the_minor_page_faults_each_step_takes():
    """A step that writes to freshly mapped memory faults in every page of it; one that reuses memory does not."""
    spec = BenchSpec(preset="tiny", rank=None, profile="ci", steps=2, workload="lm", batch=1, seq=8, budget=None,
                     micro_batches=1, store=None, scratch=None, threads=None)
    mapped = 64 << 20  # far above any malloc mmap threshold: a fresh mapping each time
    held = torch.zeros(mapped // 4)
    fresh = timed_steps(spec, get_preset("tiny"), "test", lambda batches, step: torch.ones(mapped // 4).sum())
    reused = timed_steps(spec, get_preset("tiny"), "test", lambda batches, step: held.fill_(1.0).sum())
    pages = mapped // ((2 << 20) if _transparent_huge_pages_always() else 4096)
    assert all(faults >= pages * 0.9 for faults in fresh.minor_faults), fresh.minor_faults
    assert all(faults < pages * 0.1 for faults in reused.minor_faults), reused.minor_faults
    assert len(fresh.seconds) == len(fresh.results) == 2


def _transparent_huge_pages_always() -> bool:
    """Whether the kernel backs every anonymous mapping with 2 MiB pages, one fault each."""
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False
