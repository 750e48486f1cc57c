"""The tools/ scripts run from a checkout and produce what they promise."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_compare_dense_trains_both_and_draws_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    out, figures = tmp_path / "curves.png", tmp_path / "figures.json"
    subprocess.run([sys.executable, str(ROOT / "tools" / "compare_dense"), "--steps", "4", "--eval-every", "2",
                    "--batch", "2", "--seq", "16", "--out", str(out), "--json", str(figures)],
                   check=True, capture_output=True, text=True)
    assert out.read_bytes().startswith(b"\x89PNG")
    results = json.loads(figures.read_text())
    assert [r["kind"] for r in results] == ["sct", "dense"]
    for r in results:
        assert [step for step, _, _ in r["evals"]] == [2, 4]
        assert r["steps"] == 4 and r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0


def test_compare_dense_with_a_time_limit_plots_against_time(tmp_path):
    pytest.importorskip("matplotlib")
    out, figures = tmp_path / "curves.png", tmp_path / "figures.json"
    subprocess.run([sys.executable, str(ROOT / "tools" / "compare_dense"), "--steps", "100000", "--dense-steps",
                    "50000", "--time-limit", "3", "--eval-every", "0", "--batch", "2", "--seq", "16",
                    "--out", str(out), "--json", str(figures)], check=True, capture_output=True, text=True)
    assert out.read_bytes().startswith(b"\x89PNG")
    for r in json.loads(figures.read_text()):
        assert 0 < r["steps"] < 50000 and "--time-limit 3" in r["command"]
        (step, minutes, _), = r["evals"]  # the run's closing evaluation
        assert step == r["steps"] and 3 / 60 < minutes < 1


def test_plot_cost_curve_draws_real_bench_results(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "cost.jsonl"
    for preset in ("tiny", "smollm2-135m"):
        bench = subprocess.run([sys.executable, "-m", "sct_edge", "bench", "step", "--preset", preset, "--workload",
                                "lm", "--batch", "1", "--seq", "16", "--steps", "1", "--profile", "ci", "--engine",
                                "streamed", "--threads", "1", "--json", "--scratch", str(tmp_path)],
                               check=True, capture_output=True, text=True)
        with results.open("a") as f:
            f.write(bench.stdout)
    out = tmp_path / "cost.png"
    plotted = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_cost_curve"), str(results), "--out",
                              str(out)], check=True, capture_output=True, text=True)
    assert out.read_bytes().startswith(b"\x89PNG")
    lines = plotted.stdout.splitlines()
    assert lines[0].startswith("tiny: step ") and lines[1].startswith("smollm2-135m: step ")
    assert all(re.search(r"disk floor \d+\.\d s \(\d+% of the step\), peak RSS [\d,]+ MiB \(plan [\d,]+\)", line)
               for line in lines[:2])


def test_plot_cost_curve_names_a_bad_results_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"engine": "streamed"\n')
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_cost_curve"), str(bad)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.strip() == f"{bad}:1: not a JSON line (Expecting ',' delimiter)"


def test_gemm_peaks_measures_torch_onednn_and_openblas():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gemm_peaks"), "--threads", "1", "--sizes", "64", "96",
                           "--repeats", "1", "--json"], check=True, capture_output=True, text=True)
    report = json.loads(done.stdout)
    assert report["threads"] == 1 and report["openblas_kernels"]
    for library in ("torch", "onednn", "openblas"):
        assert set(report[f"{library}_gemm_per_size"]) == {"64", "96"}
        assert report[f"{library}_gemm_peak_flops"] == max(report[f"{library}_gemm_per_size"].values()) > 0
        assert report[f"{library}_gemm_peak_library"] == library
    for library in ("onednn", "openblas"):
        assert report[f"{library}_over_torch"] == report[f"{library}_gemm_peak_flops"] / report["torch_gemm_peak_flops"]
