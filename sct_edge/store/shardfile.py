"""One shard file of the store: a standard `.safetensors` file written in one streamed pass, and read back as
zero-copy tensor views of a private memory map.

Layout of a shard file (plain safetensors, so `safetensors.safe_open` reads it):

    8 bytes   little-endian header length N
    N bytes   JSON header: every tensor's dtype, shape and data offsets, and `__metadata__` with
              `format: pt` and `sct_edge_shard`: a JSON string {name, kind, version, data_crc32, store_format}
              (padded with spaces so the data starts on a 4096-byte boundary: page-aligned tensors)
    data      the tensors back to back, in header order

The checksum the manifest records is the zlib crc32 of the whole file. The writer computes it in the same
pass that writes the data: the header goes out first with a placeholder `data_crc32`, the data is streamed
while its crc runs, the final header (same length) is written over the placeholder, and the two crcs are
joined with `crc32_combine` (zlib's algorithm), so no byte is read back. An all-zero tensor set (fresh
AdamW moments) is not written at all: the file is extended and the range preallocated, which reads as zeros,
reserves the space and costs no data transfer.

`MappedShard` maps a file `MAP_PRIVATE` with write permission (copy-on-write): the tensors it hands out can
be modified in RAM, the file never changes. The views keep the map alive through a `memoryview`, so `release`
closes the map when no view is left and otherwise drops its pages with `madvise(MADV_DONTNEED)`.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from sct_edge.errors import SctError

DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
DATA_ALIGN = 4096
MAX_HEADER = 100 * 2**20  # safetensors' own limit
CHUNK = 64 * 2**20
STORE_FORMAT = 1  # bump together with store.FORMAT_VERSION when the shard layout changes


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # safetensors dtype name: F32, BF16, F16
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> list:
        return [self.dtype, list(self.shape)]


@dataclass(frozen=True)
class ShardId:
    """What a shard file says it is, in its `sct_edge_shard` metadata."""

    name: str
    kind: str  # "weights" or "optim"
    version: int


@dataclass(frozen=True)
class WrittenShard:
    bytes: int
    crc32: int  # of the whole file


@dataclass
class ShardHeader:
    data_start: int
    tensors: dict[str, tuple[TensorSpec, int, int]]  # key -> (spec, begin, end) relative to data_start
    shard: ShardId | None
    data_crc32: int | None
    metadata: dict[str, str]

    @property
    def data_bytes(self) -> int:
        return max((end for _, _, end in self.tensors.values()), default=0)


# ----------------------------------------------------------------------------------------------- crc32


def _gf2_times(mat: tuple[int, ...] | list[int], vec: int) -> int:
    total, i = 0, 0
    while vec:
        if vec & 1:
            total ^= mat[i]
        vec >>= 1
        i += 1
    return total


@lru_cache(maxsize=64)
def _zeros_operator(power: int) -> tuple[int, ...]:
    """The GF(2) operator that advances a raw crc32 register over 2**power zero bytes."""
    if power == 0:
        one_bit = [0xEDB88320] + [1 << (n - 1) for n in range(1, 32)]  # one zero bit
        op = one_bit
        for _ in range(3):  # 1 -> 2 -> 4 -> 8 bits
            op = [_gf2_times(op, op[n]) for n in range(32)]
        return tuple(op)
    half = list(_zeros_operator(power - 1))
    return tuple(_gf2_times(half, half[n]) for n in range(32))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine)."""
    power = 0
    while len2:
        if len2 & 1:
            crc1 = _gf2_times(_zeros_operator(power), crc1)
        len2 >>= 1
        power += 1
    return crc1 ^ crc2


@lru_cache(maxsize=256)
def crc32_zeros(length: int) -> int:
    """crc32 of `length` zero bytes, in O(log length) without touching memory."""
    crc, block, power = 0, zlib.crc32(b"\0"), 0  # block: crc32 of 2**power zero bytes
    while length:
        if length & 1:
            crc = crc32_combine(crc, block, 1 << power)
        block = crc32_combine(block, block, 1 << power)
        length >>= 1
        power += 1
    return crc


def file_crc32(path: Path, split: int, buf: bytearray) -> tuple[int, int, int]:
    """(crc32 of the whole file, crc32 of its bytes from `split` on, file length), streamed through `buf` so a
    large shard never sits in RAM."""
    head_crc, data_crc, total = 0, 0, 0
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            cut = min(max(split - total, 0), n)
            head_crc = zlib.crc32(view[:cut], head_crc)
            data_crc = zlib.crc32(view[cut:n], data_crc)
            total += n
    return crc32_combine(head_crc, data_crc, max(total - split, 0)), data_crc, total


# ---------------------------------------------------------------------------------------------- writing


def _header_bytes(shard: ShardId, specs: dict[str, TensorSpec], data_crc: int) -> bytes:
    meta = {
        "name": shard.name,
        "kind": shard.kind,
        "version": shard.version,
        "data_crc32": f"{data_crc:08x}",
        "store_format": STORE_FORMAT,
    }
    header: dict = {"__metadata__": {"format": "pt", "sct_edge_shard": json.dumps(meta, separators=(",", ":"))}}
    offset = 0
    for key, spec in specs.items():
        header[key] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    pad = (-(8 + len(text))) % DATA_ALIGN
    text += b" " * pad
    return struct.pack("<Q", len(text)) + text


def _tensor_bytes(tensor: Tensor, spec: TensorSpec) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype != DTYPES[spec.dtype]:
        t = t.to(DTYPES[spec.dtype])
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def write_shard(
    path: Path, shard: ShardId, specs: dict[str, TensorSpec], tensors: dict[str, Tensor] | None
) -> WrittenShard:
    """Write a complete, fsynced shard file at `path` (a fresh temporary name; the caller renames it).

    `tensors=None` writes all-zero tensors without transferring any data. `tensors` must match `specs`
    (the caller checks names and shapes); values are cast to the spec's dtype. OSError propagates.
    """
    header = _header_bytes(shard, specs, 0)
    data_len = sum(s.nbytes for s in specs.values())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(header))
        if tensors is None:
            os.ftruncate(fd, len(header) + data_len)
            if data_len and hasattr(os, "posix_fallocate"):
                # Reserve the blocks now so a full disk shows up here, not later in the middle of training.
                os.posix_fallocate(fd, len(header), data_len)
            data_crc = crc32_zeros(data_len)
        else:
            data_crc = 0
            for key, spec in specs.items():
                data = _tensor_bytes(tensors[key], spec)
                for start in range(0, len(data), CHUNK):
                    chunk = data[start : start + CHUNK]
                    data_crc = zlib.crc32(chunk, data_crc)
                    _write_all(fd, chunk)
        final = _header_bytes(shard, specs, data_crc)
        assert len(final) == len(header)  # the crc field has a fixed width
        os.pwrite(fd, final, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return WrittenShard(len(header) + data_len, crc32_combine(zlib.crc32(final), data_crc, data_len))


def is_no_space(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


# ---------------------------------------------------------------------------------------------- reading


def parse_header(raw: bytes, label: str, file_size: int) -> ShardHeader:
    """Parse and sanity-check a safetensors header (`raw` starts at byte 0 of the file)."""
    if len(raw) < 8:
        raise SctError(f"{label}: file is truncated ({file_size} bytes, not even a safetensors header)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER or 8 + n > file_size:
        raise SctError(f"{label}: not a safetensors file (header length {n} does not fit in {file_size} bytes)")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (ValueError, UnicodeDecodeError):
        raise SctError(f"{label}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise SctError(f"{label}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[TensorSpec, int, int]] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise SctError(f"{label}: header entry for tensor {key} is malformed") from None
        if dtype not in DTYPES:
            raise SctError(f"{label}: tensor {key} has dtype {dtype}, which the store does not use")
        spec = TensorSpec(dtype, shape)
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin and end - begin == spec.nbytes):
            raise SctError(f"{label}: tensor {key} has data offsets {[begin, end]} that do not match its shape")
        tensors[key] = (spec, begin, end)
    spans = sorted((b, e) for _, b, e in tensors.values())
    if any(b != prev_end for (b, _), prev_end in zip(spans, [0] + [e for _, e in spans[:-1]], strict=True)):
        raise SctError(f"{label}: tensor data offsets leave gaps or overlap")
    data_start = 8 + n
    data_len = spans[-1][1] if spans else 0
    if data_start + data_len != file_size:
        raise SctError(f"{label}: file is {file_size} bytes but its header describes {data_start + data_len}")
    shard, data_crc = None, None
    if "sct_edge_shard" in metadata:
        try:
            meta = json.loads(metadata["sct_edge_shard"])
            shard = ShardId(str(meta["name"]), str(meta["kind"]), int(meta["version"]))
            data_crc = int(meta["data_crc32"], 16)
        except (ValueError, TypeError, KeyError):
            raise SctError(f"{label}: sct_edge_shard metadata is malformed") from None
    return ShardHeader(data_start, tensors, shard, data_crc, metadata)


def read_header(path: Path, label: str) -> ShardHeader:
    """The header of the shard file at `path`, reading only its first bytes."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            raw = head + f.read(min(n, MAX_HEADER)) if 8 + n <= size else head
    except FileNotFoundError:
        raise SctError(f"{label}: file is missing") from None
    except OSError as error:
        raise SctError(f"{label}: cannot read: {error.strerror}") from None
    return parse_header(raw, label, size)


class MappedShard:
    """A shard file mapped copy-on-write; `tensors()` are views into the map (no copy)."""

    def __init__(self, path: Path, header: ShardHeader, label: str) -> None:
        self.path = path
        self.header = header
        self.label = label
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise SctError(f"{label}: file is missing") from None
        try:
            self.stat = os.fstat(fd)
            if self.stat.st_size != header.data_start + header.data_bytes:
                raise SctError(f"{label}: file changed size while being opened")
            self._mm: mmap.mmap | None = mmap.mmap(
                fd, self.stat.st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)
        # torch.frombuffer keeps a reference to the object it is given but not a buffer export, so it gets a
        # memoryview: while any tensor view lives, the memoryview lives and holds the map's export, which
        # makes mmap.close() refuse (BufferError) instead of unmapping memory still in use.
        self._base: Tensor | None = torch.frombuffer(memoryview(self._mm), dtype=torch.uint8)
        self._views: dict[str, Tensor] | None = None
        self._lock = threading.Lock()
        self.verified = False

    @property
    def nbytes(self) -> int:
        return self.stat.st_size

    def address(self) -> int:
        """Address of the first byte of the mapping (for zero-copy checks)."""
        if self._base is None:
            raise SctError(f"{self.label}: mapping was released")
        return self._base.data_ptr()

    def crc32(self) -> int:
        """crc32 of the whole mapped file; faults every page in, as using the tensors would."""
        return self._crc32_from(0)

    def data_crc32(self) -> int:
        """crc32 of the data section only (what the shard's own metadata records)."""
        return self._crc32_from(self.header.data_start)

    def _crc32_from(self, offset: int) -> int:
        with self._lock:
            if self._mm is None:
                raise SctError(f"{self.label}: mapping was released")
            view = memoryview(self._mm)[offset:]
        try:
            crc = 0
            for start in range(0, len(view), CHUNK):
                crc = zlib.crc32(view[start : start + CHUNK], crc)
            return crc
        finally:
            view.release()

    def tensors(self) -> dict[str, Tensor]:
        with self._lock:
            if self._base is None:
                raise SctError(f"{self.label}: mapping was released")
            if self._views is None:
                views = {}
                for key, (spec, begin, end) in self.header.tensors.items():
                    start = self.header.data_start + begin
                    dtype = DTYPES[spec.dtype]
                    if start % dtype.itemsize:
                        raise SctError(f"{self.label}: tensor {key} is not aligned to its dtype in the file")
                    views[key] = self._base[start : start + (end - begin)].view(dtype).view(spec.shape)
                self._views = views
            return dict(self._views)

    def advise_willneed(self) -> None:
        with self._lock:
            if self._mm is not None:
                self._mm.madvise(mmap.MADV_WILLNEED)

    def release(self) -> bool:
        """Unmap, or, while the caller still holds views, drop the pages from the process: True if unmapped.

        Views still held after a release stay valid memory but read the file's bytes again (changes made to
        them in RAM are dropped with the pages).
        """
        with self._lock:
            mm, self._mm = self._mm, None
            self._base = None
            self._views = None
        if mm is None:
            return True
        try:
            mm.close()
            return True
        except BufferError:
            mm.madvise(mmap.MADV_DONTNEED)
            # The map now closes itself when the last view (and with it the memoryview) is garbage collected.
            return False
