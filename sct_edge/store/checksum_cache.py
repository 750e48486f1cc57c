"""Which shard files have had their full crc32 checked, so a store checksums each file version once.

An entry remembers the file's identity (device, inode, size, mtime) with the crc32 it matched: a file
replaced or modified since no longer matches its entry and is checked again. A store owns one cache (shared
between stores only when passed in), and drops an entry when it deletes the file, so a long run keeps one
entry per live file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class ChecksumCache:
    """Paths of files whose full checksum was seen to match, with the identity they had then."""

    def __init__(self) -> None:
        self._identities: dict[str, tuple] = {}
        self._lock = threading.Lock()  # readers on the I/O threads and the writer update it concurrently

    def remember(self, path: Path, st: os.stat_result, crc: int) -> None:
        """Record that file `path`, as `st` describes it, has crc32 `crc`."""
        with self._lock:
            self._identities[str(path)] = _identity(st, crc)

    def knows(self, path: Path, st: os.stat_result, crc: int) -> bool:
        """Whether file `path`, as `st` describes it now, was seen to have crc32 `crc`."""
        with self._lock:
            return self._identities.get(str(path)) == _identity(st, crc)

    def forget(self, path: Path) -> None:
        with self._lock:
            self._identities.pop(str(path), None)

    def paths(self) -> list[str]:
        """The paths remembered, for inspection."""
        with self._lock:
            return list(self._identities)


def _identity(st: os.stat_result, crc: int) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, crc)
