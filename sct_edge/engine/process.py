"""Settings of the native libraries under torch that decide how fast a step runs and how much RAM it keeps.

glibc's malloc: its thresholds decide whether the thousands of activation and gradient allocations of a
step are reused or page-faulted afresh, and how much freed memory stays in the resident set. OpenMP: a
thread that runs torch ops gets its own team of OpenMP threads, and once the process has more OpenMP threads
than cores, libgomp stops spinning between parallel regions, so every small op waits for its team to wake.
Everything here is a no-op where the library is not there (macOS, musl).
"""

from __future__ import annotations

import ctypes
import functools

import torch


def tune_malloc() -> None:
    """Fix glibc's malloc thresholds (a no-op elsewhere) so the step neither page-faults nor hoards memory.

    Allocations up to 32 MiB (activations, gradients, AdamW scratch: a step makes thousands) are served from
    the heap and reused; with glibc's small initial mmap threshold, or a tiny one, each of them is a fresh
    mmap that the kernel must zero and fault in, which measured half the tiny preset's step time in system
    CPU. Free memory at the top of the heap beyond 64 MiB goes back to the OS, and when blocks are paged the
    reader trims every arena before each block it loads (`release_free_heap`), so paged blocks that come
    and go do not stay in the resident set.
    """
    libc = _libc()
    if libc is None:
        return  # not glibc (macOS, musl): nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)


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
    """The OpenMP runtime torch loaded (libgomp on Linux wheels), found in the process's memory map."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libomp" in line}
    except OSError:
        return None  # no /proc (macOS): leave the I/O threads at torch's default
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None
