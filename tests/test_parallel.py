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
from sct_edge.tui.state import fold
from sct_edge.tui.widgets.status_panel import replicas_line

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
    # What `sct-edge watch` on rank 1's run directory shows of the replicas.
    view = fold(events)
    assert (view.rank, view.world_size, view.comm_bytes) == (1, 2, steps_seen[-1].comm_bytes)
    assert replicas_line(view, 80).plain.startswith("rank 1 of 2  exchange ")


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
    # gloo says "reset by peer" or "closed by peer", as the socket happened to end; its advice is dropped.
    assert "by peer" in errors[0] and "GLHF" not in errors[0], errors[0]
    assert errors[0].endswith(f"store {tmp_path / 'r0'} stays at its last commit"), errors[0]


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


def test_sync_every_matches_a_hand_written_two_replica_diloco(tmp_path, text):
    from sct_edge.convert.tokenizer import ByteTokenizer
    from sct_edge.engine.adamw import OptimConfig, is_orthonormal_factor
    from sct_edge.engine.plan import make_plan
    from sct_edge.engine.process import set_compute_threads
    from sct_edge.engine.profile import load_profile
    from sct_edge.engine.step import Engine
    from sct_edge.model.config import RankPolicy, get_preset
    from sct_edge.model.retraction import householder_retraction
    from sct_edge.store.store import Store
    from sct_edge.train.data import BatchSampler, prepare_corpus
    from sct_edge.train.schedule_defaults import lr_scale

    batch, seq, steps, every, lr, mu = 2, 32, 4, 2, 0.7, 0.9
    run_torchrun("run", "--store", str(tmp_path / "d{rank}"), *TINY, "--batch", str(batch), "--steps", str(steps),
                 "--sync-every", str(every), "--data", str(text))

    # The reference: two single-process replicas on their rows of the global batch, and the outer step by hand.
    set_compute_threads(1)  # as each torchrun rank on this 2-core machine
    tiny = get_preset("tiny")
    config = tiny.with_ranks(RankPolicy.uniform(8, dense_embeddings=tiny.ranks.embed is None))
    stores = [Store.create(tmp_path / f"ref{k}", config, seed=0, state_dtype=torch.float32,
                           tokenizer_json=ByteTokenizer().to_json()) for k in (0, 1)]
    names = stores[0].weight_shard_names()
    anchor = {n: stores[0].read(n) for n in names}
    anchor = {n: {k: v.clone() for k, v in t.items()} for n, t in anchor.items()}
    momentum = {n: {k: torch.zeros_like(v) for k, v in t.items()} for n, t in anchor.items()}
    corpus = prepare_corpus([text], ByteTokenizer(), tmp_path / "ref.tokens")
    sampler = BatchSampler(corpus.train, 2 * batch, seq, 0)
    plan = make_plan(config, load_profile("ci"), batch, seq, 1, "lm")
    optim = OptimConfig(lr_spectral=1e-2, lr_dense=3e-3, weight_decay=0.0, max_grad_norm=1.0)
    engines = [Engine(s, plan, optim) for s in stores]
    for step in range(1, steps + 1):
        x, y = next(sampler)
        for k, engine in enumerate(engines):
            rows = slice(k * batch, (k + 1) * batch)
            engine.train_step([(x[rows], y[rows])], step, lr_scale(step, steps, 2, 0.1))
        if step % every:
            continue
        for engine, store in zip(engines, stores, strict=True):
            engine.flush()
            engine.close()
            store.commit(step)
        local = [{n: s.read(n) for n in names} for s in stores]
        for n in names:
            new = {}
            for key, start in anchor[n].items():
                delta = (2 * start - local[0][n][key] - local[1][n][key]) / 2
                momentum[n][key] = mu * momentum[n][key] + delta
                new[key] = start - lr * (delta + mu * momentum[n][key])
                if is_orthonormal_factor(key):
                    new[key] = householder_retraction(new[key])
            anchor[n] = new
        for store in stores:
            for n in names:
                store.release(n)
                store.write(n, anchor[n])
            store.commit(step)
        engines = [Engine(s, plan, optim) for s in stores]
    for engine in engines:
        engine.close()

    diloco = store_tensors(tmp_path / "d0")
    assert all(torch.equal(diloco[key], value) for key, value in store_tensors(tmp_path / "d1").items()
               if ".optim/" not in key and ".outer/" not in key)
    for n in names:
        for key, value in anchor[n].items():
            torch.testing.assert_close(diloco[f"{n}/{key}"], value, rtol=1e-5, atol=1e-5, msg=f"{n}/{key}")


def test_the_plan_counts_the_exchange_buffers():
    from sct_edge.engine.plan import make_plan
    from sct_edge.engine.profile import load_profile
    from sct_edge.model.config import get_preset

    config, profile = get_preset("sct-70b"), load_profile("steamdeck")
    alone = make_plan(config, profile, 1, 8, 1, "hidden-sum")
    fp32 = make_plan(config, profile, 1, 8, 1, "hidden-sum", replicas=2)
    bf16 = make_plan(config, profile, 1, 8, 1, "hidden-sum", replicas=2, grad_dtype="bfloat16")
    assert alone.comm_buffer_bytes == 0 and fp32.comm_buffer_bytes > bf16.comm_buffer_bytes > 0
    assert fp32.predicted_peak_bytes - alone.predicted_peak_bytes == fp32.comm_buffer_bytes
    # Two shards in flight, each: gradient bucket + weight bucket + averaged gradients (fp32, all blocks resident).
    assert fp32.comm_buffer_bytes == 2 * 3 * 4 * fp32.block_params


def test_sync_every_without_replicas_is_refused_and_creates_nothing(tmp_path, text):
    result = sct("run", "--store", str(tmp_path / "s"), *TINY, "--batch", "2", "--steps", "2", "--sync-every", "4",
                 "--data", str(text), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("sct-edge: error: --sync-every 4 needs several replicas: launch the run with "
                                     "torchrun")
    assert not (tmp_path / "s").exists()
