"""Process-wide settings, made once by the entry point of each command that computes, and nowhere else.

`configure_process(ProcessSettings.for_profile(profile))` is the call (nanochat's `compute_init` in spirit):
torch's compute threads and glibc's malloc thresholds are the process's, so no constructor or factory of
sct-edge changes them. The same goes for signal handlers (`signals_handled_by` restores the previous ones).
A command that trains calls it once more when its memory plan is made, with the malloc thresholds the plan
chose (`MemoryPlan.malloc`: larger tensors from the heap when the budget has room).

glibc's malloc: its thresholds decide whether the thousands of activation and gradient allocations of a
step are reused or page-faulted afresh, and how much freed memory stays in the resident set. OpenMP: a
thread that runs torch ops gets its own team of OpenMP threads, and once the process has more OpenMP threads
than cores, libgomp stops spinning between parallel regions, so every small op waits for its team to wake.
How long the workers spin is the one setting that cannot be made here: libgomp reads GOMP_SPINCOUNT when torch
loads, so `sct_edge/cli.py`'s `main` sets it before any command imports torch (`OPENMP_SPIN_ITERATIONS`).
Everything here is a no-op where the library is not there (macOS, musl).
"""

from __future__ import annotations

import ctypes
import functools
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sct_edge.engine.malloc import GLIBC_MALLOC, STEP_MALLOC, MallocThresholds
from sct_edge.engine.profile import Profile
from sct_edge.model.fused import openmp_runtime_paths
from sct_edge.model.products import onednn_available, use_onednn, uses_onednn


@dataclass(frozen=True)
class ProcessSettings:
    """What a command sets process-wide before it computes; None leaves the library's own choice."""

    threads: int | None = None  # torch's intra-op (compute) threads
    malloc: MallocThresholds | None = None
    onednn: bool | None = None  # the step's float32 products on oneDNN where it has AVX-512 (`model/products.py`)

    @classmethod
    def for_profile(cls, profile: Profile, threads: int | None = None) -> ProcessSettings:
        """The settings of a streamed step under `profile`: its usable threads (or `threads`), the step's malloc."""
        return cls(threads=threads or profile.usable_threads(), malloc=STEP_MALLOC)


_applied_malloc: MallocThresholds | None = None  # mallopt has no getter: what configure_process last set


def configure_process(settings: ProcessSettings) -> None:
    """Apply `settings` to the process: called once by a command's entry point, before it computes."""
    if settings.threads is not None:
        set_compute_threads(settings.threads)
    if settings.malloc is not None:
        _set_malloc(settings.malloc)
    if settings.onednn is not None:
        use_onednn(settings.onednn)


def current_process_settings() -> ProcessSettings:
    """The compute threads now, the malloc thresholds `configure_process` set (None: glibc's own) and the products'
    route."""
    return ProcessSettings(threads=torch.get_num_threads(), malloc=_applied_malloc, onednn=uses_onednn())


def restore_process(settings: ProcessSettings) -> None:
    """Put back settings taken with `current_process_settings` (glibc's initial thresholds where it had its own)."""
    set_compute_threads(settings.threads or torch.get_num_threads())
    if settings.malloc != _applied_malloc:
        _set_malloc(settings.malloc or GLIBC_MALLOC)
    use_onednn(onednn_available() if settings.onednn is None else settings.onednn)


def set_compute_threads(threads: int) -> None:
    """Set torch's compute threads: at an entry point, or when the run's edge policy throttles the step."""
    torch.set_num_threads(threads)


def _set_malloc(thresholds: MallocThresholds) -> None:
    global _applied_malloc
    libc = _libc()
    if libc is None:
        return  # not glibc (macOS, musl): nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, thresholds.mmap_bytes)
    libc.mallopt(m_trim_threshold, thresholds.trim_bytes)
    _applied_malloc = thresholds


@contextmanager
def signals_handled_by(handler: Callable[[], None], signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
                       ) -> Iterator[None]:
    """Call `handler` on any of `signals` inside the block; the previous handlers are back after it."""
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, lambda *_: handler())
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def release_free_heap() -> None:
    """Return the free memory of every malloc arena to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def single_openmp_thread() -> None:
    """Give the calling thread a single OpenMP thread, leaving the compute thread's settings alone.

    `torch.set_num_threads` would not do: it also sets MKL's process-wide count. torch gives a thread its
    OpenMP default on the thread's first torch call, so the override comes after one.
    """
    torch.get_num_threads()
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_set_num_threads(1)


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded; None leaves the I/O threads at torch's default."""
    for path in openmp_runtime_paths():
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None
