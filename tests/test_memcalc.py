"""memcalc: the published numbers, its JSON keys, stores, measured runs, bad input, and tools/memcalc itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sct_edge.cli import main
from sct_edge.events import SCHEMA_VERSION, Event, StartEvent, StepEvent, event_to_json
from sct_edge.model.accounting import GB, MB, published_numbers
from sct_edge.model.config import RankPolicy, get_preset
from sct_edge.store.store import Store

ROOT = Path(__file__).resolve().parents[1]
# The mission's reference file (its name predates the rename); the package's copy when it is not beside the checkout.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "seed_numbers.json"
TOOL = ROOT / "tools" / "memcalc"


@pytest.fixture(scope="module")
def published_figures() -> dict:
    return published_numbers(SHARED if SHARED.exists() else None)


def memcalc_json(capsys, *args: str) -> dict:
    assert main(["memcalc", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def memcalc_error(capsys, *args: str) -> str:
    assert main(["memcalc", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sct-edge: error: ")
    return lines[0]


def test_published_numbers(capsys, published_figures):
    ref = published_figures["sct_70b_class"]
    r = memcalc_json(capsys, "--preset", "sct-70b", "--rank", "32", "--profile", "steamdeck")
    assert r["params"]["published_dense_equivalent"] == ref["dense_equivalent_params"]
    assert r["params"]["published_spectral"] == ref["spectral_params_rank32"]
    assert round(r["dense_train_bytes"] / GB, 1) == ref["dense_adam_gb"]
    assert round(r["sct_in_memory_bytes"] / GB, 2) == ref["sct_adam_gb_rank32"]
    assert round(r["compression"]) == ref["compression_rank32"]
    assert round(r["sct_in_memory_bytes"] / MB, 1) == published_figures["steam_deck_step_s"]["memory_mb_estimated"]
    assert r["layer_table_rank"] == 32
    for row, published in zip(r["layer_table"], published_figures["per_mlp_layer_rank32_mb"], strict=True):
        assert (row["model"], row["in"], row["out"]) == (published["model"], published["in"], published["out"])
        assert (
            round(row["dense_train_bytes"] / MB, 1 if published["dense_adam_mb"] < 100 else 0)
            == published["dense_adam_mb"]
        )
        assert round(row["sct_train_bytes"] / MB, 1) == published["sct_mb"]
        assert round(row["compression"]) == published["compression"]
    assert r["layer_table_at_rank"] is None


def test_text_output(capsys):
    assert main(["memcalc", "--preset", "sct-70b", "--rank", "32", "--profile", "steamdeck"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "1,245.5 GB",
        "7.24 GB",
        "7,235.5 MB",
        "172× smaller",
        "log scale",
        "resident blocks: all 80",
        "13×",
        "51×",
        "93×",
        "104×",
        "199×",
        "an estimate",
        "not a measurement",
        "full-size 8192 × 8192 k and v",
        "Python + torch",
    ):
        assert expected in out, expected
    assert "█" in out


JSON_KEYS = {
    "model",
    "source",
    "ranks",
    "energy",
    "per_matrix_ranks",
    "workload",
    "batch",
    "seq",
    "micro_batches",
    "params",
    "dense_train_bytes",
    "dense_whole_model",
    "dense_whole_model_bytes",
    "sct_in_memory_bytes",
    "sct_in_memory_whole_model",
    "sct_in_memory_whole_model_bytes",
    "compression",
    "profile",
    "budget_bytes",
    "predicted_peak_bytes",
    "store_bytes",
    "io_read_bytes_per_step",
    "io_write_bytes_per_step",
    "io_bytes_per_step",
    "io_seconds_per_step",
    "plan",
    "layer_table_rank",
    "layer_table",
    "layer_table_at_rank",
    "measured",
    "notes",
}


def test_json_schema_is_stable(capsys):
    r = memcalc_json(capsys, "--preset", "llama3-70b", "--rank", "128", "--profile", "steamdeck")
    assert set(r) == JSON_KEYS
    assert set(r["dense_whole_model"]) == {"block_matrices", "norms", "embedding", "lm_head", "activations", "total"}
    assert r["plan"]["resident_blocks"] < 80 and r["io_bytes_per_step"] > 0
    assert r["predicted_peak_bytes"] <= r["budget_bytes"] == 10 * 2**30
    assert r["io_bytes_per_step"] == r["io_read_bytes_per_step"] + r["io_write_bytes_per_step"]
    assert [row["rank"] for row in r["layer_table_at_rank"]] == [128] * 5


def test_whole_model_adds_what_the_seeds_left_out(capsys):
    r = memcalc_json(capsys, "--preset", "llama3-70b", "--rank", "32")
    whole = r["dense_whole_model"]
    assert r["params"]["dense_total"] == 70_553_706_496
    assert whole["embedding"] == whole["lm_head"] == 128256 * 8192 * 16
    assert whole["activations"] > 0
    assert whole["total"] == sum(v for k, v in whole.items() if k != "total") > r["dense_train_bytes"]
    hidden_sum = memcalc_json(capsys, "--preset", "sct-70b", "--workload", "hidden-sum")
    assert hidden_sum["dense_whole_model"]["embedding"] == hidden_sum["plan"]["embed_head_bytes"] == 0


def test_budget_and_speed_flags(capsys):
    r = memcalc_json(
        capsys,
        "--preset",
        "llama3-8b",
        "--profile",
        "ci",
        "--budget",
        "2GiB",
        "--read-speed",
        "2.4GB",
        "--write-speed",
        "4.2GB",
    )
    assert r["budget_bytes"] == 2 * 2**30
    assert r["io_seconds_per_step"] == pytest.approx(
        r["io_read_bytes_per_step"] / 2.4e9 + r["io_write_bytes_per_step"] / 4.2e9
    )


def test_clip_plans_the_held_gradients_of_a_run(capsys):
    plain = memcalc_json(capsys, "--preset", "tiny", "--profile", "ci", "--batch", "2", "--seq", "16")
    clipped = memcalc_json(capsys, "--preset", "tiny", "--profile", "ci", "--batch", "2", "--seq", "16", "--clip")
    held = clipped["plan"]["held_gradient_bytes"]
    assert not plain["plan"]["holds_gradients"] and clipped["plan"]["holds_gradients"] and held > 0
    assert clipped["predicted_peak_bytes"] == plain["predicted_peak_bytes"] + held


def write_store(store: Path, ranks: RankPolicy) -> Path:
    Store.create(store, get_preset("tiny").with_ranks(ranks)).close()
    return store


def test_store_manifest_and_energy(capsys, tmp_path):
    overrides = {f"layers.{i}.mlp.{m}": 5 + i for i in range(4) for m in ("gate", "up", "down")}
    store = write_store(tmp_path / "store", RankPolicy(attn=20, mlp=32, energy=0.95, overrides=overrides))
    r = memcalc_json(capsys, "--store", str(store), "--energy", "0.95", "--profile", "ci")
    assert r["source"] == f"store {store}" and r["per_matrix_ranks"] and r["energy"] == 0.95
    default_ranks = memcalc_json(capsys, "--preset", "tiny", "--rank", "20", "--profile", "ci")
    assert r["params"]["published_spectral"] < default_ranks["params"]["published_spectral"]
    assert "ranks for 0.9 are unknown" in memcalc_error(capsys, "--store", str(store), "--energy", "0.9")
    plain = write_store(tmp_path / "plain", RankPolicy(attn=16, mlp=16))
    assert "not converted by energy" in memcalc_error(capsys, "--store", str(plain), "--energy", "0.95")
    assert "needs --store" in memcalc_error(capsys, "--preset", "tiny", "--energy", "0.95")
    assert "no manifest.json" in memcalc_error(capsys, "--store", str(tmp_path))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{}")
    assert "not an sct-edge store manifest" in memcalc_error(capsys, "--store", str(tmp_path / "bad"))
    # memcalc reads a store through the store's one manifest reader, format version check included
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    assert "store format version 99" in memcalc_error(capsys, "--store", str(store), "--energy", "0.95")


def write_run(tmp_path: Path, predicted: dict, scale: float) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    config = get_preset("tiny").to_dict()
    events: list[Event] = [
        StartEvent(
            time=0.0, config=config, store=str(tmp_path / "store"), profile="ci", budget_bytes=2**30, batch=2, seq=16,
            micro_batches=1, workload="lm", total_steps=3, start_step=0, n_blocks=config["n_layers"],
            resident_blocks=0, prefetch_depth=1, activations="recompute", predicted_peak_bytes=1,
        ),
    ]
    for step in range(1, 4):
        events.append(
            StepEvent(
                time=float(step), step=step, total_steps=3, loss=5.0, lr_spectral=0.01, lr_dense=0.003,
                tokens_per_s=64.0, step_s=0.5, phase_s={"forward": 0.1}, bytes_read=1000 * step, bytes_written=2000,
                rss_bytes=1, peak_rss_bytes=int(predicted["predicted_peak_bytes"] * scale), available_bytes=2**33,
                budget_bytes=2**30, resident_blocks=0, ortho_err=1e-7, grad_norm=None, battery=None,
                temperature_c=None, eta_s=0.0,
            )
        )
    (run / "events.jsonl").write_text("".join(event_to_json(e) + "\n" for e in events) + '{"event": "st')
    return run


def test_measured_run_directory(capsys, tmp_path):
    prediction = memcalc_json(capsys, "--preset", "tiny", "--profile", "ci", "--batch", "2", "--seq", "16")
    run = write_run(tmp_path, prediction, scale=1.25)
    r = memcalc_json(capsys, "--measured", str(run))
    m = r["measured"]
    assert (r["batch"], r["seq"], r["profile"]) == (2, 16, "ci")
    assert r["predicted_peak_bytes"] == prediction["predicted_peak_bytes"]
    assert m["steps"] == 3 and m["peak_rss_bytes"] == int(prediction["predicted_peak_bytes"] * 1.25)
    assert m["bytes_read_per_step"] == 2500  # median of the steady steps 2 and 3
    assert m["error_percent"]["peak_rss_bytes"] == pytest.approx(-20.0, abs=1e-3)
    assert m["error_percent"]["bytes_read_per_step"] == pytest.approx(-100.0)
    assert main(["memcalc", "--measured", str(run)]) == 0
    out = capsys.readouterr().out
    assert "measured (" in out and "-20.0 %" in out
    assert "differs from the measured run" in memcalc_error(capsys, "--measured", str(run), "--seq", "32")
    assert "records its model" in memcalc_error(capsys, "--measured", str(run), "--preset", "tiny")


def test_measured_run_of_a_newer_schema_or_a_broken_event_is_refused(capsys, tmp_path):
    prediction = memcalc_json(capsys, "--preset", "tiny", "--profile", "ci", "--batch", "2", "--seq", "16")
    run = write_run(tmp_path, prediction, scale=1.0)
    path = run / "events.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    step = json.loads(lines[2])
    del step["bytes_read"]
    path.write_text("".join([lines[0], lines[1], json.dumps(step) + "\n"]))
    assert memcalc_error(capsys, "--measured", str(run)) == f"sct-edge: error: {path}:3: step event lacks bytes_read"
    start = json.loads(lines[0])
    path.write_text(json.dumps({**start, "schema": SCHEMA_VERSION + 1}) + "\n" + lines[1])
    error = memcalc_error(capsys, "--measured", str(run))
    assert f"{path}:1: event schema version {SCHEMA_VERSION + 1} is newer" in error


def test_measured_bench_json(capsys, tmp_path):
    line = {
        "preset": "sct-70b",
        "rank": 32,
        "workload": "hidden-sum",
        "engine": "streamed",
        "step_s": 6.0,
        "peak_rss_bytes": 6 * 10**9,
        "bytes_read": 0,
        "bytes_written": 0,
        "budget_bytes": 10 * 2**30,
        "steps": 4,
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(line) + "\n")
    r = memcalc_json(capsys, "--measured", str(path), "--profile", "steamdeck")
    assert r["model"] == "sct-70b" and r["workload"] == "hidden-sum" and r["plan"]["resident_blocks"] == 80
    assert r["measured"]["error_percent"]["bytes_read_per_step"] == 0.0
    expected = (r["predicted_peak_bytes"] - 6 * 10**9) / (6 * 10**9) * 100
    assert r["measured"]["error_percent"]["peak_rss_bytes"] == pytest.approx(expected)
    empty = tmp_path / "empty.json"
    empty.write_text('{"hello": 1}\n')
    assert "neither run events" in memcalc_error(capsys, "--measured", str(empty), "--preset", "tiny")
    assert "no events.jsonl" in memcalc_error(capsys, "--measured", str(tmp_path), "--preset", "tiny")


def test_former_workload_name_seed_still_works(capsys, tmp_path):
    """`--workload seed` and bench lines written before the rename mean hidden-sum; the flag says so in one line."""
    assert main(["memcalc", "--preset", "sct-70b", "--workload", "seed", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["workload"] == "hidden-sum"
    assert captured.err == "sct-edge: note: --workload seed is now called --workload hidden-sum\n"
    old_line = {"preset": "sct-70b", "rank": 32, "workload": "seed", "peak_rss_bytes": 6 * 10**9,
                "bytes_read": 0, "bytes_written": 0, "budget_bytes": 10 * 2**30}
    (tmp_path / "bench.json").write_text(json.dumps(old_line) + "\n")
    r = memcalc_json(capsys, "--measured", str(tmp_path / "bench.json"), "--profile", "steamdeck")
    assert r["workload"] == "hidden-sum" and r["plan"]["embed_head_bytes"] == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "tiny", "--rank", "0"], "--rank must be at least 1"),
        (["--preset", "tiny", "--rank", "129"], "outside 1..128"),
        (["--preset", "tiny", "--energy", "0"], "--energy must be in (0, 1]"),
        (["--preset", "tiny", "--energy", "1.5"], "--energy must be in (0, 1]"),
        (["--preset", "tiny", "--profile", "nope"], "unknown profile 'nope'"),
        (["--preset", "sct-70b", "--budget", "64MiB"], "try --budget"),
        (["--preset", "tiny", "--budget", "lots"], "--budget"),
        (["--preset", "llama3-70b", "--workload", "hidden-sum"], "needs full-size k and v"),
        ([], "give --preset NAME or --store DIR"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, expected):
    assert expected in memcalc_error(capsys, *args)


def test_tools_memcalc_runs_from_the_checkout(tmp_path):
    # -S: no site-packages, so the editable install cannot help; the script must find the checkout itself.
    result = subprocess.run(
        [sys.executable, "-S", str(TOOL), "--preset", "sct-70b", "--rank", "32", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert round(json.loads(result.stdout)["dense_train_bytes"] / GB, 1) == 1245.5
    failed = subprocess.run(
        [sys.executable, "-S", str(TOOL), "--preset", "nope"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert failed.returncode == 2 and failed.stderr.startswith("memcalc: error: unknown preset")
    assert TOOL.stat().st_mode & 0o111 and TOOL.read_text().startswith("#!/usr/bin/env python3\n")


def test_a_reader_that_goes_away_ends_the_output_quietly():
    """`sct-edge memcalc ... | head -1`: no BrokenPipeError traceback, the shell's 128 + SIGPIPE status.

    The reading end is closed before the command has started up, so its first write meets the broken pipe."""
    process = subprocess.Popen([sys.executable, "-m", "sct_edge", "memcalc", "--preset", "sct-70b", "--rank", "32"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    assert process.wait(timeout=120) == 141
    assert process.stderr.read() == ""
