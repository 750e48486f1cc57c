"""glibc malloc's thresholds for a step: plain numbers, free of torch, so the memory plan (and `tools/memcalc`,
which runs without torch) can choose them; `sct_edge.engine.process` applies them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MallocThresholds:
    """glibc malloc's mmap and trim thresholds (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD)."""

    mmap_bytes: int
    trim_bytes: int


# The step's thresholds. Allocations up to 32 MiB (activations, gradients, AdamW scratch: a step makes
# thousands) are served from the heap and reused; with glibc's small initial mmap threshold, or a tiny one,
# each of them is a fresh mmap that the kernel must zero and fault in, which measured half the tiny preset's
# step time in system CPU. Free memory at the top of the heap beyond 64 MiB goes back to the OS, and when
# blocks are paged the pager trims every arena before each block it loads (`release_free_heap`, decided by
# the memory plan), so paged blocks that come and go do not stay in the resident set.
STEP_MALLOC = MallocThresholds(mmap_bytes=32 << 20, trim_bytes=64 << 20)
# glibc's initial values. glibc adapts its thresholds until they are first set; once set they stay fixed,
# so these are as near as a process can come back to the defaults.
GLIBC_MALLOC = MallocThresholds(mmap_bytes=128 << 10, trim_bytes=128 << 10)
