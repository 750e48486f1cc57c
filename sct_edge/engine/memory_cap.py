"""Run a command under a hard memory cap (Linux cgroup v1 memory controller, page cache charged).

Used by `sct-edge bench step --cap` and the capped tests to prove a profile holds: the kernel, not our
own accounting, enforces the limit, and anything over it is reclaimed or OOM-killed.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sct_edge.engine.profile import parse_size
from sct_edge.errors import SctError

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


def cgroup_available() -> bool:
    return (MEMORY_ROOT / "memory.limit_in_bytes").exists() and os.access(MEMORY_ROOT, os.W_OK)


@dataclass
class MemoryCap:
    """A command prefix that runs the rest inside the capped cgroup, and what the cgroup saw afterwards."""

    prefix: list[str]
    group: Path
    usage: dict = field(default_factory=dict)

    def read_usage(self) -> dict:
        for key in ("max_usage_in_bytes", "failcnt", "limit_in_bytes"):
            path = self.group / f"memory.{key}"
            if path.exists():
                self.usage[f"cgroup_{key}"] = int(path.read_text())
        return self.usage


@contextmanager
def memory_cap(cap: str) -> Iterator[MemoryCap]:
    """A fresh memory cgroup limited to `cap` (swap included where the kernel accounts it), removed afterwards."""
    if not cgroup_available():
        raise SctError(f"a hard memory cap needs a writable cgroup v1 memory controller at {MEMORY_ROOT} (root)")
    limit = parse_size(cap, "--cap")
    group = MEMORY_ROOT / f"sct-edge-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    memsw = group / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        memsw.write_text(str(limit))
    script = f"echo $$ > {shlex.quote(str(group / 'cgroup.procs'))} && exec \"$@\""
    try:
        yield MemoryCap(["sh", "-c", script, "sct-edge-capped"], group)
    finally:
        try:
            group.rmdir()
        except OSError:
            pass
