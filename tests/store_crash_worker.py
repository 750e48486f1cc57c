"""Helper of test_store_crash: a fork server whose children commit steps to a store until they are SIGKILLed.

`python store_crash_worker.py STORE` imports torch and the store once, then obeys lines on stdin:
  `fork K`  fork a writer, answer `pid N`; the writer commits steps store.step + 1, + 2, ... and prints
            `step N` after each commit returns; with K > 0 it SIGKILLs itself right before its K-th
            file-system call (write, pwrite, fsync, ftruncate, fallocate, rename, unlink): a crash at an
            exact boundary of the commit protocol, which a kill from outside at a random time rarely hits
  `reap N`  wait for process N, answer `reaped N STATUS`
Forking a process that has imported torch but run no kernel is safe and makes each trial cost milliseconds
instead of a fresh interpreter's seconds. Every line is one `os.write` of less than PIPE_BUF bytes, so the
lines of the server and its children never interleave.

What a step writes is a pure function of the step (`written_at`, `step_tensors`, `step_state`), so the test
can tell exactly which committed state a store holds.
"""

from __future__ import annotations

import os
import signal
import sys
import zlib

import torch

from sct_edge.engine.process import ProcessSettings, configure_process
from sct_edge.store.store import Store


def written_at(index: int, step: int) -> bool:
    """Whether shard number `index` is rewritten at `step`: two thirds of the shards, a different third each step."""
    return (step + index) % 3 != 0


def step_tensors(name: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], step: int) -> dict:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}:{step}".encode()))
    return {key: torch.randn(shape, generator=generator).to(dtype) for key, (dtype, shape) in specs.items()}


def step_state(step: int) -> dict:
    return {"step": step, "cursor": 17 * step, "rng": [step, step + 1]}


_write = os.write  # not counted by crash_before


def say(line: str) -> None:
    _write(1, f"{line}\n".encode())


def crash_before(calls: int) -> None:
    """Make this process SIGKILL itself right before its `calls`-th file-system call."""
    remaining = [calls]

    def wrap(function):
        def wrapped(*args, **kwargs):
            remaining[0] -= 1
            if remaining[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return wrapped

    for name in ("write", "pwrite", "fsync", "ftruncate", "posix_fallocate", "replace", "rename", "unlink"):
        if hasattr(os, name):
            setattr(os, name, wrap(getattr(os, name)))


def writer(path: str) -> None:
    configure_process(ProcessSettings(threads=1))
    store = Store.open(path)
    with store.lock():
        names = store.shard_names()
        step = store.step
        while True:
            step += 1
            for index, name in enumerate(names):
                if written_at(index, step):
                    store.write(name, step_tensors(name, store.specs(name), step))
            store.commit(step, step_state(step))
            say(f"step {step}")


def serve(path: str) -> None:
    for line in sys.stdin:
        command, *args = line.split()
        if command == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    if int(args[0]) > 0:
                        crash_before(int(args[0]))
                    writer(path)
                except BaseException as error:  # the test must see a writer that died on its own
                    os.write(2, f"writer failed: {error}\n".encode())
                finally:
                    os._exit(1)
            say(f"pid {pid}")
        elif command == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            say(f"reaped {args[0]} {status}")


if __name__ == "__main__":
    serve(sys.argv[1])
