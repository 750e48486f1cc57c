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
# A step whose hidden-state tensors come from the heap (nothing paged, the plan counts the heap's slack) never
# trims it: a trim hands back the free top of the heap, and the next block's tensors fault it in again, page by
# page. Whether the top is free at a given moment depends on which tensor happens to sit last, so a step either
# faulted a few hundred thousand pages a step or none. llama3-8b r128 at 4 x 512, 8 of its blocks (1 kept, 7
# with memos), in one process each: 11.9 and 11.3 s a step with 424-763 k minor faults against 9.6 and 8.3 s
# with none; all 32 blocks, 42.3 against 31.7 s (338-452 k faults against none); under a 10 GiB cap the trimmed
# step happened to fault nothing and both took 29-33 s. The peak is the heap's highest top either way (10,072 and
# 10,148 MiB under the cap).
NO_TRIM = -1  # glibc: "setting M_TRIM_THRESHOLD to -1 disables trimming completely"
# glibc's initial values. glibc adapts its thresholds until they are first set; once set they stay fixed,
# so these are as near as a process can come back to the defaults.
GLIBC_MALLOC = MallocThresholds(mmap_bytes=128 << 10, trim_bytes=128 << 10)
