"""Training across replicas on torch.distributed (gloo on loopback, 2 ranks, the tiny preset, a few steps):
bit-identical replicas, equality with one process on the combined batch, kill-and-restart, a lost peer,
mismatched stores."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_train import assert_bit_identical, sct, store_tensors

from sct_edge.errors import SctError
from sct_edge.events import StepEvent, read_events
from sct_edge.parallel.world import World, detect_world, expand_rank

TEXT = ("The quick brown fox jumps over the lazy dog. Spectral factors train on small devices. " * 120)
TINY = ["--profile", "ci", "--no-tui", "--preset", "tiny", "--rank", "8", "--seq", "32", "--eval-every", "0",
        "--warmup", "2"]


def torchrun(*args: str, nproc: int = 2, restarts: int = 0, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", str(restarts), "-m", "sct_edge", *args]


def run_torchrun(*args: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun(*args, **kwargs), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"torchrun exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_world_comes_from_torchrun_environment():
    assert detect_world({}) == World()
    world = detect_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (world.rank, world.size, world.local_rank, world.local_size, world.distributed) == (3, 4, 1, 2, True)
    assert world.threads(16) == 8 and World().threads(2) == 2
    assert [world.owner(i) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert expand_rank(Path("/data/r{rank}/store"), world) == Path("/data/r3/store")
    assert expand_rank(Path("/data/store"), world) == Path("/data/store")
    with pytest.raises(SctError, match="inconsistent"):
        detect_world({"RANK": "4", "WORLD_SIZE": "4"})


def test_replicas_are_bit_identical_and_equal_one_process_on_the_combined_batch(tmp_path, text):
    steps = ["--steps", "3", "--data", str(text)]
    run_torchrun("run", "--store", str(tmp_path / "r{rank}"), *TINY, "--batch", "2", *steps)
    r0, r1 = tmp_path / "r0", tmp_path / "r1"
    weights0 = {k: v for k, v in store_tensors(r0).items() if ".optim/" not in k}
    weights1 = {k: v for k, v in store_tensors(r1).items() if ".optim/" not in k}
    assert weights0.keys() == weights1.keys()
    for key in weights0:
        assert torch.equal(weights0[key], weights1[key]), key
    sct("run", "--store", str(tmp_path / "single"), *TINY, "--batch", "4", *steps)
    single = store_tensors(tmp_path / "single")
    for key, value in weights0.items():
        torch.testing.assert_close(value, single[key], rtol=1e-5, atol=1e-5, msg=key)
    events = read_events(tmp_path / "r1.runs" / "events.jsonl")
    steps_seen = [e for e in events if isinstance(e, StepEvent)]
    assert len(steps_seen) == 3 and all(e.comm_bytes > 0 for e in steps_seen)


def test_a_killed_rank_restarts_and_the_run_ends_bit_identical(tmp_path, text):
    steps = ["--steps", "8", "--commit-every", "2", "--data", str(text)]
    run_torchrun("run", "--store", str(tmp_path / "ref{rank}"), *TINY, "--batch", "2", *steps)
    launcher = subprocess.Popen(torchrun("run", "--store", str(tmp_path / "k{rank}"), *TINY, "--batch", "2",
                                         *steps, restarts=1),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    events = tmp_path / "k1.runs" / "events.jsonl"
    deadline = time.monotonic() + 300
    while not (events.exists() and any(isinstance(e, StepEvent) and e.step >= 3 for e in read_events(events))):
        assert time.monotonic() < deadline and launcher.poll() is None, "rank 1 never reached step 3"
        time.sleep(0.05)
    rank1 = next(p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=600) == 0, launcher.stderr.read()[-3000:]
    for rank in (0, 1):
        assert_bit_identical(tmp_path / f"k{rank}", tmp_path / f"ref{rank}")


def test_a_lost_peer_stops_the_others_with_one_line(tmp_path, text):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    args = ["run", "--store", str(tmp_path / "r{rank}"), *TINY, "--batch", "2", "--steps", "100000",
            "--commit-every", "1000", "--data", str(text), "--peer-timeout", "20"]
    ranks = [subprocess.Popen([sys.executable, "-m", "sct_edge", *args], env={**env, "RANK": str(r), "LOCAL_RANK":
                              str(r)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    events = tmp_path / "r0.runs" / "events.jsonl"
    deadline = time.monotonic() + 300
    while not (events.exists() and any(isinstance(e, StepEvent) and e.step >= 2 for e in read_events(events))):
        assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].stderr.read()[-2000:]
        time.sleep(0.05)
    ranks[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    assert ranks[0].wait(timeout=120) != 0
    assert time.monotonic() - started < 60
    err = ranks[0].stderr.read()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("sct-edge: error: rank 0: lost contact") and "Traceback" not in err
    assert "Connection reset by peer" in errors[0] and "GLHF" not in errors[0], errors[0]


def test_mismatched_replicas_are_refused(tmp_path, text):
    sct("run", "--store", str(tmp_path / "r0"), *TINY, "--batch", "2", "--steps", "2", "--data", str(text))
    sct("run", "--store", str(tmp_path / "r1"), *TINY, "--batch", "2", "--steps", "1", "--data", str(text))
    result = subprocess.run(torchrun("run", "--store", str(tmp_path / "r{rank}"), *TINY, "--batch", "2",
                                     "--steps", "4", "--data", str(text)), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "replicas differ: rank 1" in result.stderr and str(tmp_path / "r1") in result.stderr


def test_a_resume_with_another_world_size_is_refused(tmp_path, text):
    run_torchrun("run", "--store", str(tmp_path / "r{rank}"), *TINY, "--batch", "2", "--steps", "2", "--data",
                 str(text))
    result = sct("run", "--store", str(tmp_path / "r0"), *TINY, "--batch", "2", "--steps", "4", "--data", str(text),
                 check=False)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("resume it with 2 rank(s), not 1"), result.stderr
    assert "Traceback" not in result.stderr
