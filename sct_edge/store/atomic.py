"""Atomic, durable file replacement: the one temp-file, write, fsync, rename, fsync-directory sequence.

A reader sees either the old file or the complete new one, never a part, and after the call returns the
new file survives a power cut: its data is fsynced before the rename and the directory entry after it.
Used by the store (manifest, tokenizer), the token cache of the data pipeline and the HF exporter.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import BinaryIO


def temporary_name(final: str) -> str:
    """A fresh hidden name beside `final` for its content while it is being written (`.NAME.xxxxxxxx.tmp`)."""
    return f".{final}.{secrets.token_hex(4)}.tmp"


class AtomicFile:
    """A binary file written under a temporary name that replaces `path` only when `commit` is called.

    As a context manager it commits when the block ends normally and discards the temporary file when it
    raises. `tmp_path` names the temporary file where the caller recognises its own leftovers by name.
    """

    def __init__(self, path: Path, tmp_path: Path | None = None) -> None:
        self.path = path
        self.tmp_path = tmp_path or path.with_name(temporary_name(path.name))
        self.file: BinaryIO = open(self.tmp_path, "wb")

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)

    def commit(self) -> None:
        """Make the written content durable and put it in place of `path` (OSError propagates, the
        temporary file removed)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        """Drop the temporary file; `path` is left as it was."""
        self.file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path: Path, data: bytes, tmp_path: Path | None = None) -> None:
    """Replace `path` by `data` atomically and durably (`tmp_path`: as for `AtomicFile`)."""
    with AtomicFile(path, tmp_path) as out:
        out.write(data)


def publish(tmp_path: Path, path: Path) -> None:
    """Durably move the complete file `tmp_path` over `path` (fsync, rename); the caller fsyncs the directory
    once after a batch of them with `fsync_dir`."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp_path, path)


def fsync_dir(path: Path) -> None:
    """Make the renames and deletions in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
