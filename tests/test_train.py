"""`sct-edge run` for real on `tiny`: it learns, resumes bit-exactly after SIGKILL, stops cleanly on
SIGINT/SIGTERM, refuses a second trainer, and turns bad input into one-line errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sct_edge.events import CommitEvent, EndEvent, EvalEvent, StepEvent, read_events

FAST = ["--profile", "ci", "--no-tui", "--batch", "4", "--seq", "32", "--preset", "tiny", "--eval-every", "0"]


def sct(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "sct_edge", *args], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"sct-edge {' '.join(args)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return result


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sct_edge", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def store_tensors(path: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((path / "manifest.json").read_text())
    tensors = {}
    for name, entry in manifest["shards"].items():
        for key, value in load_file(path / entry["file"]).items():
            tensors[f"{name}/{key}"] = value
    return tensors


def assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = store_tensors(a), store_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["step"] == mb["step"] and ma["state"] == mb["state"]


def wait_for_step(events: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if events.exists() and any(isinstance(e, StepEvent) and e.step >= step for e in read_events(events)):
            return
        if process.poll() is not None:
            raise AssertionError(f"run exited early: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_time_limit_stops_commits_and_evaluates_the_last_step(tmp_path):
    store, runs = tmp_path / "store", tmp_path / "runs"
    sct("run", "--store", str(store), "--run-dir", str(runs), *FAST, "--steps", "100000", "--time-limit", "4")
    events = read_events(runs / "events.jsonl")
    last_step = max(e.step for e in events if isinstance(e, StepEvent))
    assert 0 < last_step < 100000
    assert isinstance(events[-1], EndEvent) and (events[-1].reason, events[-1].step) == ("time_limit", last_step)
    assert [e.step for e in events if isinstance(e, EvalEvent)] == [last_step]
    assert json.loads((store / "manifest.json").read_text())["step"] == last_step


def test_tiny_run_learns_and_eval_generate_work(tmp_path):
    store, runs = tmp_path / "store", tmp_path / "runs"
    sct("run", "--store", str(store), "--run-dir", str(runs), *FAST[:-2], "--eval-every", "20", "--steps", "60",
        "--batch", "8", "--seq", "64")
    evals = [e for e in read_events(runs / "events.jsonl") if isinstance(e, EvalEvent)]
    assert [e.step for e in evals] == [20, 40, 60]
    assert evals[-1].val_loss < evals[0].val_loss - 0.3, evals
    steps = [e for e in read_events(runs / "events.jsonl") if isinstance(e, StepEvent)]
    assert steps[-1].loss < steps[0].loss - 1.0
    assert steps[-1].tokens_per_s > 0 and steps[-1].bytes_read >= 0 and steps[-1].peak_rss_bytes > 0
    assert {"forward", "backward", "optimizer", "retraction"} <= set(steps[-1].phase_s)
    assert steps[-1].ortho_err < 1e-5
    text = tmp_path / "text.txt"
    text.write_text(Path(json.__file__).read_text())
    result = json.loads(sct("eval", str(store), "--text", str(text), "--seq-len", "64", "--json",
                            "--profile", "ci").stdout)
    assert result["tokens"] > 0 and 1 < result["ppl"] < 256
    out = sct("generate", str(store), "--prompt", "def ", "--max-new-tokens", "20", "--profile", "ci").stdout
    assert out.startswith("def ") and len(out) > 10


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    steps = ["--steps", "14", "--commit-every", "3"]
    reference = tmp_path / "reference"
    sct("run", "--store", str(reference), *FAST, *steps)
    rng = random.Random(1234)
    for trial in range(3):
        store, runs = tmp_path / f"killed{trial}", tmp_path / f"runs{trial}"
        process = spawn("run", "--store", str(store), "--run-dir", str(runs), *FAST, *steps)
        wait_for_step(runs / "events.jsonl", rng.randint(1, 12), process)
        time.sleep(rng.random() * 0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
        sct("run", "--store", str(store), "--run-dir", str(runs), *FAST, *steps, "--resume")
        assert_bit_identical(store, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_commits_and_exits_cleanly(tmp_path, sig):
    store, runs = tmp_path / "store", tmp_path / "runs"
    process = spawn("run", "--store", str(store), "--run-dir", str(runs), *FAST, "--steps", "100000")
    wait_for_step(runs / "events.jsonl", 3, process)
    process.send_signal(sig)
    assert process.wait(timeout=60) == 0, process.stderr.read()
    events = read_events(runs / "events.jsonl")
    last_step = max(e.step for e in events if isinstance(e, StepEvent))
    assert isinstance(events[-1], EndEvent) and (events[-1].reason, events[-1].step) == ("stopped", last_step)
    assert any(isinstance(e, CommitEvent) and e.step == last_step for e in events)
    assert json.loads((store / "manifest.json").read_text())["step"] == last_step
    assert "Traceback" not in process.stderr.read()


def test_second_trainer_on_the_same_store_is_refused(tmp_path):
    store, runs = tmp_path / "store", tmp_path / "runs"
    first = spawn("run", "--store", str(store), "--run-dir", str(runs), *FAST, "--steps", "100000")
    try:
        wait_for_step(runs / "events.jsonl", 1, first)
        second = sct("run", "--store", str(store), "--run-dir", str(tmp_path / "runs2"), *FAST, check=False)
        assert second.returncode == 2
        assert "another process" in second.stderr and "Traceback" not in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


def directory_state(path: Path) -> dict[str, bytes]:
    """Every file's bytes, except `lock`, which only records the pid of the last process that held it."""
    files = (p for p in sorted(path.rglob("*")) if p.is_file() and p.name != "lock")
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def test_bad_inputs_are_one_line_errors_and_change_nothing(tmp_path):
    store = tmp_path / "store"
    sct("run", "--store", str(store), *FAST, "--steps", "2")
    before = directory_state(store)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "missing data": ["--data", str(tmp_path / "nope.txt")],
        "empty corpus": ["--data", str(empty)],
        "other model / nothing to resume": ["--preset", "smollm2-135m", "--resume"],
        "bad profile key": ["--profile", str(_bad_profile(tmp_path))],
        "budget too small": ["--budget", "1KiB"],
    }
    for what, extra in cases.items():
        flags = [f for f in FAST if f not in ("--profile", "ci")] if "--profile" in extra else FAST
        for target in (store, tmp_path / "new-store"):  # a trained store, and one that does not exist yet
            result = sct("run", "--store", str(target), *flags, "--steps", "4", *extra, check=False)
            assert result.returncode == 2, (what, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("sct-edge: error:"), (what, result.stderr)
            assert directory_state(store) == before, what
            assert not (tmp_path / "new-store").exists(), what
    # A corrupt shard: one flipped byte is found and named, and the store is left as it is.
    manifest = json.loads((store / "manifest.json").read_text())
    shard = store / manifest["shards"]["block.001"]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    corrupt = directory_state(store)
    result = sct("run", "--store", str(store), *FAST, "--steps", "4", check=False)
    assert result.returncode == 2 and "block.001" in result.stderr and "Traceback" not in result.stderr
    assert directory_state(store) == corrupt


def _bad_profile(tmp_path: Path) -> Path:
    text = (Path(__file__).resolve().parents[1] / "profiles" / "ci.toml").read_text()
    path = tmp_path / "bad.toml"
    path.write_text(text + "\nmystery_knob = 3\n")
    return path


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_dense_baseline_trains_the_same_architecture(tmp_path):
    store = tmp_path / "dense"
    sct("run", "--store", str(store), "--dense", *FAST, "--steps", "3")
    manifest = json.loads((store / "manifest.json").read_text())
    ranks = manifest["config"]["ranks"]
    assert ranks["attn"] is None and ranks["mlp"] is None
    assert manifest["step"] == 3
