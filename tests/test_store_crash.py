"""Crash consistency: writers committing steps in a loop are SIGKILLed at random instants (at a random time from
outside, or right before a random one of their own file-system calls); after every kill the store opens, holds
exactly one committed state (the last or the one being committed), verifies, and stays within its disk bound.

SIGKILL leaves the page cache intact, so this tests the ordering of the protocol, not the fsyncs that make it
survive power loss (that needs a block device that drops unsynced writes)."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from store_crash_worker import step_state, step_tensors, written_at

from sct_edge.model.config import get_preset
from sct_edge.store.store import LOCK, MANIFEST, TOKENIZER, Store

TRIALS = 40


class ForkServer:
    def __init__(self, store: Path) -> None:
        worker = Path(__file__).with_name("store_crash_worker.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(worker), str(store)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.split())

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float = 120) -> list[str]:
        return self.lines.get(timeout=timeout)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def expected_tensors(name: str, index: int, specs, step: int, initial: dict) -> dict:
    last = next((s for s in range(step, 0, -1) if written_at(index, s)), 0)
    return initial[name] if last == 0 else step_tensors(name, specs, last)


def assert_holds_step(store: Store, step: int, initial: dict) -> None:
    assert store.state == (step_state(step) if step else {})
    for index, name in enumerate(store.shard_names()):
        expected = expected_tensors(name, index, store.specs(name), step, initial)
        found = store.read(name)
        for key, tensor in expected.items():
            assert torch.equal(found[key].view(torch.int32), tensor.view(torch.int32)), (name, key, step)
        del found
        store.release(name)


def test_sigkill_at_random_instants_leaves_one_committed_state(tmp_path):
    path = tmp_path / "store"
    with Store.create(path, get_preset("tiny"), seed=0) as store:
        initial = {n: {k: v.clone() for k, v in store.read(n).items()} for n in store.shard_names()}
        size = store.committed_bytes()
        largest = max(store.shard_bytes(n) for n in store.shard_names())
    rng = random.Random(20240611)
    server = ForkServer(path)
    step = 0
    try:
        for trial in range(TRIALS):
            # Even trials: killed from outside at a random time. Odd trials: the writer kills itself right
            # before a random one of its file-system calls (a few hundred per step), so the kill lands on
            # every boundary of the protocol, the few-millisecond manifest switch included.
            inside = trial % 2 == 1
            server.send(f"fork {rng.randint(1, 900) if inside else 0}")
            reported, pid = [], None
            wait_for_commit = not inside and rng.random() < 0.85  # else the kill may land during start-up
            while pid is None or (wait_for_commit and not reported):
                kind, value = server.next()
                if kind == "pid":
                    pid = int(value)
                else:
                    reported.append(int(value))
            if not inside:
                time.sleep(rng.uniform(0.0, 0.25))
                os.kill(pid, signal.SIGKILL)
            server.send(f"reap {pid}")
            while (line := server.next())[0] != "reaped":
                reported.append(int(line[1]))
            status = int(line[2])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the writer died on its own"
            last_reported = max(reported, default=step)

            with Store.open(path) as store:
                # committed everything it reported, and at most the one commit it was in when killed
                assert last_reported <= store.step <= last_reported + 1
                step = store.step
                assert_holds_step(store, step, initial)
                store.verify()
            on_disk = sum(p.stat().st_size for p in path.iterdir())
            assert on_disk <= 2 * size + largest + 2 * (path / MANIFEST).stat().st_size
    finally:
        server.close()
    assert step >= TRIALS // 2  # the writers made progress: most trials wait for a commit before the kill

    with Store.open(path) as store, store.lock():  # a writer cleans the leftovers of the last crash
        referenced = {store.shard_file(n).name for n in store.shard_names()}
        assert {p.name for p in path.iterdir()} == referenced | {MANIFEST, TOKENIZER, LOCK}
        assert_holds_step(store, step, initial)
