"""`sct-edge run` on JSONL examples and imported stores: the loss is the mean over counted targets, masked
positions never count, everything is checked before the first step, a mistyped store path is refused, and an
imported store gets the fine-tuning defaults."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sct_edge.engine.adamw import OptimConfig
from sct_edge.engine.plan import make_plan
from sct_edge.engine.profile import load_profile
from sct_edge.engine.step import IGNORE_INDEX, Engine
from sct_edge.events import EndEvent, StartEvent, StepEvent, read_events
from sct_edge.model.config import get_preset
from sct_edge.model.transformer import Transformer
from sct_edge.store.store import Store
from sct_edge.train.schedule_defaults import FINE_TUNING, FROM_SCRATCH, schedule_defaults

FAST = ["--profile", "ci", "--no-tui", "--batch", "4", "--seq", "32", "--eval-every", "0"]
CHAT = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                      {"role": "assistant", "content": f"{i + 1}."}]} for i in range(12)]


def sct(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "sct_edge", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"sct-edge {' '.join(args)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return result


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def directory_state(path: Path) -> dict[str, bytes]:
    files = (p for p in sorted(path.rglob("*")) if p.is_file() and p.name != "lock")
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def test_loss_is_the_mean_over_counted_targets_and_an_empty_batch_is_zero(tmp_path):
    config = dataclasses.replace(get_preset("tiny"), n_layers=1)
    store = Store.create(tmp_path / "store", config, seed=0, state_dtype=torch.float32)
    plan = make_plan(config, load_profile("ci"), 2, 16, 2, "lm")
    engine = Engine(store, plan, OptimConfig(max_grad_norm=1.0), torch.device("cpu"))
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (2, 16), generator=generator)
        y = torch.randint(0, 256, (2, 16), generator=generator)
        y_masked = y.clone()
        y_masked[0, :10] = IGNORE_INDEX  # a prompt
        y_masked[1, 5:] = IGNORE_INDEX  # padding
        other = torch.full((2, 16), IGNORE_INDEX)  # a micro-batch with nothing to count
        model = Transformer(config, seed=0).eval()
        with torch.no_grad():
            logits = model(x)
        expected = F.cross_entropy(logits.flatten(0, 1), y_masked.flatten())  # mean over the 6 + 5 counted
        got = engine.evaluate([(x, y_masked), (x, other)])
        assert abs(got - float(expected)) < 1e-4
        assert engine.evaluate([(x, other)]) == 0.0
        result = engine.train_step([(x, y_masked), (x, other)], 1)
        assert result.tokens == 11 and abs(result.loss - float(expected)) < 1e-4
        empty = engine.train_step([(x, other)], 2)
        assert empty.tokens == 0 and empty.loss == 0.0 and empty.grad_norm == 0.0
    finally:
        engine.close()


def test_run_on_a_missing_store_needs_a_preset(tmp_path):
    target = tmp_path / "typo"
    result = sct("run", "--store", str(target), *FAST, "--steps", "1", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"sct-edge: error: there is no store at {target}; pass --preset NAME to create a new one there "
        "(see `sct-edge presets`)"]
    assert not target.exists()


def test_chat_jsonl_run_counts_answer_tokens_and_bad_data_leaves_the_store(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    store, runs = tmp_path / "store", tmp_path / "runs"
    sct("run", "--store", str(store), "--run-dir", str(runs), "--preset", "tiny", "--data", str(data), *FAST,
        "--steps", "2", "--seq", "96")
    events = read_events(runs / "events.jsonl")
    start = next(e for e in events if isinstance(e, StartEvent))
    assert start.data["kind"] == "examples" and start.data["formats"] == {str(data): "chat"}
    assert (start.data["train"], start.data["val"], start.data["truncated"]) == (11, 1, 0)
    assert start.defaults["name"] == FROM_SCRATCH.name
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert len(steps) == 2 and all(e.tokens_per_s > 0 for e in steps)
    assert isinstance(events[-1], EndEvent) and events[-1].reason == "done"

    before = directory_state(store)
    # Each kind of bad line is checked in test_chat_data; here, that the run refuses before touching anything:
    # the trained store continuing on its data file, now broken, and a new store.
    write_jsonl(data, [CHAT[0], "{\"messages\": ["])
    for target in (store, tmp_path / "new"):
        result = sct("run", "--store", str(target), "--preset", "tiny", "--data", str(data), *FAST, "--steps", "4",
                     "--seq", "96", check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "chat.jsonl:2: invalid JSON" in lines[0], result.stderr
    assert directory_state(store) == before
    assert not (tmp_path / "new").exists()


def test_short_validation_text_degrades_with_a_note_before_the_first_step(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    val = tmp_path / "val.txt"
    val.write_text("a short line\n")  # 13 bytes + separator: fewer tokens than one window of 33
    runs = tmp_path / "runs"
    sct("run", "--store", str(tmp_path / "store"), "--run-dir", str(runs), "--preset", "tiny", "--data", str(train),
        "--val-data", str(val), *FAST, "--steps", "1")
    events = read_events(runs / "events.jsonl")
    start = next(e for e in events if isinstance(e, StartEvent))
    assert start.notes and "validation uses one window of" in start.notes[0]
    assert events[-1].reason == "done"


def test_schedule_defaults_follow_the_store_and_flags_win():
    assert schedule_defaults({"imported_from": {"path": "model.gguf"}}) is FINE_TUNING
    assert schedule_defaults({}) is schedule_defaults(None) is FROM_SCRATCH
    settings, filled = FINE_TUNING.fill({"lr_spectral": None, "lr_dense": 0.5, "warmup": None, "min_lr_ratio": None,
                                         "steps": 7, "batch": 4})
    assert settings == {"lr_spectral": FINE_TUNING.lr_spectral, "lr_dense": 0.5, "warmup": FINE_TUNING.warmup,
                        "min_lr_ratio": FINE_TUNING.min_lr_ratio, "steps": 7, "batch": 4}
    assert filled == {"lr_spectral": FINE_TUNING.lr_spectral, "warmup": FINE_TUNING.warmup,
                      "min_lr_ratio": FINE_TUNING.min_lr_ratio}


@pytest.mark.slow
def test_imported_store_gets_fine_tuning_defaults(tmp_path):
    sct("run", "--store", str(tmp_path / "base"), "--preset", "tiny", *FAST, "--steps", "1")
    sct("export", str(tmp_path / "base"), str(tmp_path / "hf"))
    sct("import", str(tmp_path / "hf"), str(tmp_path / "imported"), "--full-rank", "--quiet")
    runs = tmp_path / "runs"
    result = sct("run", "--store", str(tmp_path / "imported"), "--run-dir", str(runs),
                 "--data", str(write_jsonl(tmp_path / "c.jsonl", CHAT)), *FAST, "--steps", "1", "--warmup", "3",
                 "--seq", "96")
    start = next(e for e in read_events(runs / "events.jsonl") if isinstance(e, StartEvent))
    # Flags win: --warmup and --steps were given, the rest came from the fine-tuning defaults.
    assert start.defaults == {"name": FINE_TUNING.name, "lr_spectral": FINE_TUNING.lr_spectral,
                              "lr_dense": FINE_TUNING.lr_dense, "min_lr_ratio": FINE_TUNING.min_lr_ratio}
    assert "fine-tuning defaults: lr_spectral 2e-05" in result.stderr + result.stdout
