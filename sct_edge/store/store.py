"""The spectral store: a model's factors and AdamW state as safetensors shards on disk, read through memory
maps, updated step after step, and never left half-written.

Layout of a store directory:

    manifest.json                      what the store is and which file holds each shard (see `Manifest`)
    tokenizer.json                     the tokenizer's `to_json()`, written once at creation
    lock                               `flock`ed by the one process that writes (pid inside)
    embed.v000000.safetensors          embedding: `embed.weight` or `embed.U/s/V`
    embed.optim.v000000.safetensors    its AdamW moments: `<key>.exp_avg`, `<key>.exp_avg_sq`
    block.000.v000012.safetensors      block 0, keys relative to the block (`attn.q.U`, `mlp_norm.weight`, ...);
    block.000.optim.v000012.safetensors  the model-level name is `layers.0.` + key
    ...
    head.v000000.safetensors           `norm.weight` (final norm) and `head.weight` or `head.U/s/V` (none when tied)
    head.optim.v000000.safetensors

Weights are float32; moments are in the store's state dtype (float32 or bfloat16). `vNNNNNN` is the shard's
version: the commit generation that wrote it (0 = creation). Shard files are immutable once renamed into place.

Commit protocol (crash consistency). A shard update is written to a temporary name, fsynced and renamed to
the next version's name; it is invisible until a commit. `commit` fsyncs the directory, writes the new
manifest to a temporary file, fsyncs it, renames it over `manifest.json` (the atomic switch) and fsyncs the
directory again; only then are the versions the new manifest no longer names deleted. A crash at any
instant leaves the old manifest (and every file it names) or the new one: never a mix of steps. Leftovers of
a crash (temporary files, uncommitted or superseded versions) are deleted when a process next takes the
write lock, never a file the manifest names, and nothing matching no store pattern.

Disk bound: the committed shards plus at most one uncommitted version of each shard, i.e. at most 2x the
store, plus the shard files being written at that instant (one per writing thread) and two manifests.

Memory maps: `read` maps a shard copy-on-write and returns tensors that are views into the map (no copy;
callers may modify them in RAM, the file never changes). `release` unmaps it, or, if views are still held,
drops its pages with `madvise(MADV_DONTNEED)`. A file is checksummed in full the first time this process
maps that file version (and files this process wrote count as checked); `open` does only cheap checks
(manifest, sizes, headers) and `verify` checksums everything.

Public API (what the scheduler and trainer call):
    Store.create(path, config, *, seed, state_dtype, tokenizer_json, extra, tensors, progress) -> Store
    Store.open(path) -> Store;  store.close() / `with Store.open(p) as store:`
    store.config, .step, .state, .generation, .seed, .state_dtype, .extra, .manifest
    store.shard_names(), .weight_shard_names(), .kind(name), .specs(name), .shard_bytes(name), .shard_file(name)
    store.read(name) -> {key: tensor view}, store.prefetch(name), store.release(name), store.mapped_address(name)
    store.lock() (context manager; write/commit/discard take it implicitly), store.write(name, tensors),
    store.write_zeros(name), store.commit(step, state, extra), store.discard(), store.verify() -> VerifyReport,
    store.tokenizer_json()
    store.bytes_read, store.bytes_written (counters), store.committed_bytes(), store.create_stats
An importer passes `tensors=` (a function shard name -> weights) to `create` and puts its per-matrix report in
`extra={"import_report": [{"matrix", "shape", "rank", "kept_energy", "rel_error", "svd"}, ...]}`; `inspect`
shows it.
Helpers: store_layout(config, state_dtype), initial_tensors(config, seed, name); shard names and file names
are built and parsed by `sct_edge.store.shard_names`, the manifest read by `sct_edge.store.manifest_file`,
files replaced by `sct_edge.store.atomic`, checksummed file versions remembered by the store's `ChecksumCache`.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import re
import shutil
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sct_edge import __version__ as SCT_EDGE_VERSION
from sct_edge.convert.tokenizer import ByteTokenizer
from sct_edge.errors import SctError
from sct_edge.model.config import ModelConfig
from sct_edge.model.transformer import Block, RMSNorm, build_embedding, build_head
from sct_edge.store.atomic import atomic_write, fsync_dir, temporary_name
from sct_edge.store.checksum_cache import ChecksumCache
from sct_edge.store.manifest_file import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    manifest_config,
    parse_manifest,
    read_manifest_bytes,
)
from sct_edge.store.shard_names import (
    block_index,
    block_shard,
    is_optim,
    optim_shard,
    outer_shard,
    parse_shard_file,
    shard_file_name,
)
from sct_edge.store.shardfile import (
    DTYPE_NAMES,
    DTYPES,
    MappedShard,
    ShardHeader,
    ShardId,
    TensorSpec,
    file_crc32,
    is_no_space,
    read_header,
    write_shard,
)

TOKENIZER = "tokenizer.json"
LOCK = "lock"
PREPARED = "manifest.prepared.json"  # phase one of a commit shared with other replicas (see `prepare_commit`)
STATE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MOMENTS = ("exp_avg", "exp_avg_sq")
OUTER_PARTS = ("anchor", "momentum")  # DiLoCo: the weights the replicas last agreed on, the outer momentum

_TMP_FILE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


# --------------------------------------------------------------------------------------------- layout


def _spec(t: Tensor) -> TensorSpec:
    return TensorSpec(DTYPE_NAMES[t.dtype], tuple(t.shape))


def _weight_layout(config: ModelConfig) -> dict[str, dict[str, TensorSpec]]:
    # Built from meta-device modules so the store names exactly what the model builds.
    layout = {"embed": {f"embed.{k}": _spec(v) for k, v in build_embedding(config, device="meta").state_dict().items()}}
    for i in range(config.n_layers):
        layout[block_shard(i)] = {k: _spec(v) for k, v in Block(config, i, device="meta").state_dict().items()}
    head = {"norm.weight": TensorSpec("F32", (config.dim,))}
    module = build_head(config, device="meta")
    if module is not None:
        head.update({f"head.{k}": _spec(v) for k, v in module.state_dict().items()})
    layout["head"] = head
    return layout


def store_layout(
    config: ModelConfig, state_dtype: str = "float32", outer: bool = False
) -> dict[str, tuple[str, dict[str, TensorSpec]]]:
    """Every shard of a store for `config`, in order: name -> (kind, {key: spec}).

    With `outer` (a store trained by replicas in DiLoCo mode, `extra["outer_state"]`), each weights shard
    also has an outer-state shard: the anchor the replicas last agreed on and the outer momentum (float32)."""
    state = DTYPE_NAMES[STATE_DTYPES[state_dtype]]
    layout: dict[str, tuple[str, dict[str, TensorSpec]]] = {}
    for name, specs in _weight_layout(config).items():
        layout[name] = ("weights", specs)
        moments = {f"{k}.{m}": TensorSpec(state, s.shape) for k, s in specs.items() for m in MOMENTS}
        layout[optim_shard(name)] = ("optim", moments)
        if outer:
            layout[outer_shard(name)] = ("outer", {f"{k}.{part}": TensorSpec("F32", s.shape)
                                                    for k, s in specs.items() for part in OUTER_PARTS})
    return layout


def initial_tensors(config: ModelConfig, seed: int, name: str) -> dict[str, Tensor]:
    """The random initial weights of one weights shard; equal to the same part of `Transformer(config, seed=seed)`."""
    if name == "embed":
        return {f"embed.{k}": v for k, v in build_embedding(config, seed).state_dict().items()}
    if name == "head":
        tensors = {"norm.weight": RMSNorm(config.dim, config.norm_eps).weight.detach()}
        module = build_head(config, seed)
        if module is not None:
            tensors.update({f"head.{k}": v for k, v in module.state_dict().items()})
        return tensors
    layer = block_index(name)
    if layer is None or is_optim(name):
        raise SctError(f"unknown weights shard '{name}'")
    return Block(config, layer, seed).state_dict()


# -------------------------------------------------------------------------------------------- manifest


@dataclass
class ShardEntry:
    name: str
    kind: str  # "weights" or "optim"
    file: str
    version: int
    bytes: int
    crc32: int
    tensors: dict[str, TensorSpec]

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "file": self.file,
            "version": self.version,
            "bytes": self.bytes,
            "crc32": f"{self.crc32:08x}",
            "tensors": {k: s.to_json() for k, s in self.tensors.items()},
        }

    @classmethod
    def from_json(cls, name: str, data: dict, label: str) -> ShardEntry:
        try:
            tensors = {k: TensorSpec(str(d), tuple(int(x) for x in shape)) for k, (d, shape) in data["tensors"].items()}
            entry = cls(
                name,
                str(data["kind"]),
                str(data["file"]),
                int(data["version"]),
                int(data["bytes"]),
                int(data["crc32"], 16),
                tensors,
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SctError(f"{label}: entry for shard {name} is malformed") from None
        return entry


@dataclass
class Manifest:
    """The content of manifest.json: the store's only mutable file, replaced atomically at each commit."""

    config: ModelConfig
    seed: int
    state_dtype: str
    tokenizer: dict  # {"file", "bytes", "crc32"}
    step: int
    generation: int
    state: dict
    extra: dict
    shards: dict[str, ShardEntry]
    created: str = ""
    written_by: str = SCT_EDGE_VERSION

    def to_bytes(self) -> bytes:
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "written_by": f"sct-edge {self.written_by}",
            "created": self.created,
            "config": self.config.to_dict(),
            "seed": self.seed,
            "state_dtype": self.state_dtype,
            "tokenizer": self.tokenizer,
            "step": self.step,
            "generation": self.generation,
            "state": self.state,
            "extra": self.extra,
            "shards": {name: entry.to_json() for name, entry in self.shards.items()},
        }
        try:
            return json.dumps(data, indent=1, allow_nan=False).encode()
        except (TypeError, ValueError) as error:
            raise SctError(f"store state is not JSON-serialisable: {error}") from None

    @classmethod
    def parse(cls, raw: bytes, label: str) -> Manifest:
        data = parse_manifest(raw, label)
        config = manifest_config(data, label)
        try:
            state_dtype = data["state_dtype"]
            if state_dtype not in STATE_DTYPES:
                raise SctError(f"state_dtype '{state_dtype}' is not one of {', '.join(STATE_DTYPES)}")
            manifest = cls(
                config=config,
                seed=int(data["seed"]),
                state_dtype=state_dtype,
                tokenizer=dict(data["tokenizer"]),
                step=int(data["step"]),
                generation=int(data["generation"]),
                state=dict(data["state"]),
                extra=dict(data["extra"]),
                shards={},
                created=str(data.get("created", "")),
            )
            raw_shards = dict(data["shards"])
        except KeyError as error:
            raise SctError(f"{label}: field {error} is missing") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise SctError(f"{label}: malformed field ({error})") from None
        except SctError as error:
            raise SctError(f"{label}: {error}") from None
        manifest.shards = {name: ShardEntry.from_json(name, entry, label) for name, entry in raw_shards.items()}
        manifest._check_layout(label)
        return manifest

    def _check_layout(self, label: str) -> None:
        layout = store_layout(self.config, self.state_dtype, outer=bool(self.extra.get("outer_state")))
        missing = [n for n in layout if n not in self.shards]
        unknown = [n for n in self.shards if n not in layout]
        if missing or unknown:
            parts = ([f"lacks shard(s) {', '.join(missing[:3])}"] if missing else []) + (
                [f"lists unknown shard(s) {', '.join(unknown[:3])}"] if unknown else []
            )
            raise SctError(f"{label}: {'; '.join(parts)} for model {self.config.name}")
        for name, (kind, specs) in layout.items():
            entry = self.shards[name]
            if entry.kind != kind:
                raise SctError(f"{label}: shard {name} has kind '{entry.kind}', expected '{kind}'")
            if entry.tensors != specs:
                problem = _spec_difference(entry.tensors, specs)
                raise SctError(f"{label}: shard {name}: {problem} (the manifest does not match its model config)")
        for key in ("file", "bytes", "crc32"):
            if key not in self.tokenizer:
                raise SctError(f"{label}: tokenizer entry lacks '{key}'")


def _spec_difference(found: dict[str, TensorSpec], expected: dict[str, TensorSpec]) -> str:
    for key, spec in expected.items():
        if key not in found:
            return f"tensor {key} is missing"
        if found[key] != spec:
            return (
                f"tensor {key} is {found[key].dtype} {list(found[key].shape)}, expected {spec.dtype} {list(spec.shape)}"
            )
    extra = [k for k in found if k not in expected]
    return f"unexpected tensor {extra[0]}" if extra else "tensors are in a different order"


# ------------------------------------------------------------------------------------------- file helpers


def _io_problem(error: OSError) -> str:
    if is_no_space(error):
        return "no space left on device"
    if error.errno == errno.EFBIG:
        return "file too large (file size limit reached)"
    return error.strerror or str(error)


@dataclass
class VerifyReport:
    shards: int
    bytes: int
    seconds: float
    step: int


@dataclass
class CreateStats:
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0  # building the initial tensors
    write_seconds: float = 0.0  # writing and fsyncing shard files (overlaps generation)
    data_bytes_written: int = 0  # bytes actually transferred (zero moments are preallocated, not written)
    files: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ store


class Store:
    """An open store. Create with `Store.create`, open with `Store.open`; see the module docstring."""

    def __init__(self, path: Path, manifest: Manifest, raw: bytes, checksums: ChecksumCache | None = None) -> None:
        self.path = path
        self.checksums = checksums or ChecksumCache()  # the file versions whose crc32 this store has checked
        self._manifest = manifest
        self._raw = raw
        self._pending: dict[str, ShardEntry] = {}
        self._prepared: Manifest | None = None  # a prepared commit, made current by `finish_prepared`
        self._prepared_raw = b""
        self._maps: dict[str, MappedShard] = {}
        self._mutex = threading.RLock()
        self._write_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._lock_fd: int | None = None
        self.bytes_read = 0  # bytes of shard files mapped by read()/prefetch()
        self.bytes_written = 0  # bytes of shard files and manifests written
        self.removed_stale: list[str] = []  # leftovers deleted when the write lock was taken
        self.create_stats: CreateStats | None = None

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str | Path, checksums: ChecksumCache | None = None) -> Store:
        """Open an existing store with cheap checks: manifest, format, every shard's size and header.

        `checksums`: a cache shared with other stores opened on the same files (default: the store's own)."""
        path = Path(path)
        raw = read_manifest_bytes(path)
        store = cls(path, Manifest.parse(raw, str(path / MANIFEST)), raw, checksums)
        try:
            store._check_files()
        except SctError:
            # A writer committing right now deletes the versions its new manifest supersedes: if the manifest
            # changed under us, check the new one; a store that is really broken fails this second check too.
            again = read_manifest_bytes(path)
            if again == raw:
                raise
            store = cls(path, Manifest.parse(again, str(path / MANIFEST)), again, store.checksums)
            store._check_files()
        return store

    def _label(self, name: str, entry: ShardEntry) -> str:
        return f"shard {name} ({self.path / entry.file})"

    def _check_files(self) -> None:
        for name, entry in self._manifest.shards.items():
            self._check_header(name, entry, self._stat_header(name, entry))
        tok = self._manifest.tokenizer
        try:
            size = (self.path / tok["file"]).stat().st_size
        except FileNotFoundError:
            raise SctError(f"tokenizer ({self.path / tok['file']}): file is missing") from None
        if size != tok["bytes"]:
            raise SctError(
                f"tokenizer ({self.path / tok['file']}): file is {size} bytes, the manifest says {tok['bytes']}"
            )

    def _stat_header(self, name: str, entry: ShardEntry) -> ShardHeader:
        label = self._label(name, entry)
        try:
            size = (self.path / entry.file).stat().st_size
        except FileNotFoundError:
            raise SctError(f"{label}: file is missing") from None
        if size != entry.bytes:
            what = "truncated" if size < entry.bytes else "longer than recorded"
            raise SctError(f"{label}: file is {size} bytes, the manifest says {entry.bytes} ({what})")
        return read_header(self.path / entry.file, label)

    def _check_header(self, name: str, entry: ShardEntry, header: ShardHeader) -> None:
        label = self._label(name, entry)
        if header.shard is None:
            raise SctError(f"{label}: not an sct-edge shard (no sct_edge_shard metadata): a foreign file")
        expected = ShardId(name, entry.kind, entry.version)
        if header.shard != expected:
            raise SctError(
                f"{label}: file holds {header.shard.kind} shard {header.shard.name} version "
                f"{header.shard.version}, not {entry.kind} shard {name} version {entry.version}: a foreign file"
            )
        found = {k: spec for k, (spec, _, _) in header.tensors.items()}
        if found != entry.tensors:
            raise SctError(f"{label}: header does not match the manifest: {_spec_difference(found, entry.tensors)}")

    # ---------------------------------------------------------------- properties

    @property
    def config(self) -> ModelConfig:
        return self._manifest.config

    @property
    def step(self) -> int:
        """The last committed step."""
        return self._manifest.step

    @property
    def generation(self) -> int:
        """Number of commits since creation; pending shard versions are numbered generation + 1."""
        return self._manifest.generation

    @property
    def state(self) -> dict:
        """The trainer state committed with `step` (a copy)."""
        return copy.deepcopy(self._manifest.state)

    @property
    def seed(self) -> int:
        return self._manifest.seed

    @property
    def state_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self._manifest.state_dtype]

    @property
    def extra(self) -> dict:
        """Free-form data given at creation (e.g. `import_report`), a copy."""
        return copy.deepcopy(self._manifest.extra)

    @property
    def manifest(self) -> dict:
        """The committed manifest as JSON data."""
        return json.loads(self._manifest.to_bytes())

    def shard_names(self) -> list[str]:
        """Every shard: embed, embed.optim, block.000, block.000.optim, ..., head, head.optim."""
        return list(self._manifest.shards)

    def weight_shard_names(self) -> list[str]:
        return [n for n, e in self._manifest.shards.items() if e.kind == "weights"]

    def _entry(self, name: str) -> ShardEntry:
        """The newest version of `name`: pending if written since the last commit, else committed."""
        with self._mutex:
            entry = self._pending.get(name) or self._manifest.shards.get(name)
        if entry is None:
            raise SctError(f"store {self.path} has no shard '{name}'")
        return entry

    def kind(self, name: str) -> str:
        return self._entry(name).kind

    def specs(self, name: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Key -> (dtype, shape) of every tensor of shard `name`."""
        return {k: (DTYPES[s.dtype], s.shape) for k, s in self._entry(name).tensors.items()}

    def shard_bytes(self, name: str) -> int:
        return self._entry(name).bytes

    def shard_file(self, name: str) -> Path:
        return self.path / self._entry(name).file

    def data_crc32(self, name: str) -> int:
        """crc32 of a committed shard's tensor data alone (from its header: no data is read). Unlike the
        whole file's crc it does not depend on the shard's version, so replicas with equal tensors agree."""
        entry = self._manifest.shards[name]
        header = self._stat_header(name, entry)
        self._check_header(name, entry, header)
        return header.data_crc32

    def committed_bytes(self) -> int:
        """Size of the committed store: shard files, tokenizer and manifest."""
        shards = sum(e.bytes for e in self._manifest.shards.values())
        return shards + self._manifest.tokenizer["bytes"] + len(self._raw)

    def tokenizer_json(self) -> str:
        tok = self._manifest.tokenizer
        path = self.path / tok["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SctError(f"tokenizer ({path}): file is missing") from None
        if zlib.crc32(data) != int(tok["crc32"], 16):
            raise SctError(f"tokenizer ({path}): checksum mismatch (the file is corrupt)")
        return data.decode()

    # ---------------------------------------------------------------- reading

    def _mapping(self, name: str) -> tuple[MappedShard, ShardEntry]:
        entry = self._entry(name)
        with self._mutex:
            mapped = self._maps.get(name)
            if mapped is not None and mapped.path.name != entry.file:
                self._maps.pop(name).release()  # a newer version was written since
                mapped = None
            if mapped is None:
                header = self._stat_header(name, entry)
                self._check_header(name, entry, header)
                mapped = MappedShard(self.path / entry.file, header, self._label(name, entry))
                self._maps[name] = mapped
                self.bytes_read += mapped.nbytes
        return mapped, entry

    def read(self, name: str) -> dict[str, Tensor]:
        """The tensors of shard `name` as zero-copy views of a private (copy-on-write) memory map.

        The first time this process maps a given file version its full crc32 is checked. Modifying the
        tensors changes RAM only; persist changes with `write`.
        """
        mapped, entry = self._mapping(name)
        if not mapped.verified:
            if not self.checksums.knows(mapped.path, mapped.stat, entry.crc32):
                crc = mapped.crc32()
                if crc != entry.crc32:
                    self.release(name)
                    raise SctError(
                        f"{self._label(name, entry)}: checksum mismatch: crc32 {crc:08x}, the manifest "
                        f"records {entry.crc32:08x} (the file is corrupt)"
                    )
                self.checksums.remember(mapped.path, mapped.stat, entry.crc32)
            mapped.verified = True
        return mapped.tensors()

    def prefetch(self, name: str) -> None:
        """Map shard `name` and ask the kernel to read it ahead asynchronously (a later `read` reuses the map)."""
        self._mapping(name)[0].advise_willneed()

    def release(self, name: str) -> None:
        """Unmap shard `name` so its pages leave the process. Drop your tensor views first: views still held
        stay valid but lose in-RAM changes (their pages are dropped and re-read from the file)."""
        with self._mutex:
            mapped = self._maps.pop(name, None)
        if mapped is not None:
            mapped.release()

    def mapped_address(self, name: str) -> tuple[int, int] | None:
        """(address, length) of the current mapping of `name`, or None if not mapped."""
        with self._mutex:
            mapped = self._maps.get(name)
        return None if mapped is None else (mapped.address(), mapped.nbytes)

    # ---------------------------------------------------------------- locking

    @contextmanager
    def lock(self) -> Iterator[Store]:
        """Hold the exclusive write lock for the block (released at its end unless it was already held).

        Taking the lock re-reads the manifest if another process committed meanwhile and deletes crash
        leftovers. `write`, `commit` and `discard` take it implicitly (held until `close`).
        """
        acquired = self._acquire_lock()
        try:
            yield self
        finally:
            if acquired:
                self._release_lock()

    def _acquire_lock(self) -> bool:
        if self._lock_fd is not None:
            return False
        self._lock_fd = _take_lock(self.path)
        try:
            raw = read_manifest_bytes(self.path)
            if raw != self._raw:
                self._manifest, self._raw = Manifest.parse(raw, str(self.path / MANIFEST)), raw
                self._check_files()
            self._load_prepared()
            self._clean_stale()
        except BaseException:
            self._release_lock()
            raise
        return True

    def _load_prepared(self) -> None:
        """Pick up a commit a crash left prepared (its shard versions are then not crash leftovers)."""
        try:
            raw = (self.path / PREPARED).read_bytes()
        except FileNotFoundError:
            self._prepared = None
            return
        prepared = Manifest.parse(raw, str(self.path / PREPARED))
        if prepared.step < self.step or prepared.generation != self._manifest.generation + 1:
            # Left over from a commit that was finished or superseded after all: nothing to settle.
            self._prepared = None
            self._delete(PREPARED)
            return
        self._prepared, self._prepared_raw = prepared, raw

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            self._acquire_lock()

    def _clean_stale(self) -> None:
        """Delete crash leftovers: temporary files and shard versions the manifest does not name."""
        referenced = {e.file for e in self._manifest.shards.values()} | {e.file for e in self._pending.values()}
        if self._prepared is not None:
            referenced |= {e.file for e in self._prepared.shards.values()}
        for item in os.scandir(self.path):
            if item.name in referenced or not item.is_file(follow_symlinks=False):
                continue
            if parse_shard_file(item.name) or _TMP_FILE.match(item.name):
                self._delete(item.name)
                self.removed_stale.append(item.name)

    # ---------------------------------------------------------------- writing

    def write(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Write a new version of shard `name` for the pending commit; invisible on disk until `commit`.

        `tensors` must have exactly the shard's keys and shapes; values are cast to the shard's dtype. Writing
        the same shard again before the commit replaces the pending version. Never touches a mapped file.
        """
        self._require_lock()
        entry = self._entry(name)
        keys = list(tensors)
        missing = [k for k in entry.tensors if k not in tensors]
        unexpected = [k for k in keys if k not in entry.tensors]
        if missing or unexpected:
            what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
            raise SctError(f"write {name}: tensors do not match the shard ({what})")
        for key, spec in entry.tensors.items():
            if tuple(tensors[key].shape) != spec.shape:
                raise SctError(
                    f"write {name}: tensor {key} has shape {list(tensors[key].shape)}, "
                    f"the shard holds {list(spec.shape)}"
                )
        self._write_pending(name, entry, tensors)

    def write_zeros(self, name: str) -> None:
        """Write a new all-zero version of shard `name` for the pending commit (fresh AdamW moments, say),
        without holding or transferring its data."""
        self._require_lock()
        self._write_pending(name, self._entry(name), None)

    def _write_pending(self, name: str, entry: ShardEntry, tensors: dict[str, Tensor] | None) -> None:
        with self._write_locks[name]:
            new = self._write_version(name, entry.kind, entry.tensors, tensors, self.generation + 1)
            with self._mutex:
                self._pending[name] = new

    def _write_version(
        self, name: str, kind: str, specs: dict[str, TensorSpec], tensors: dict[str, Tensor] | None, version: int
    ) -> ShardEntry:
        file = shard_file_name(name, version)
        tmp = self.path / temporary_name(file)
        try:
            written = write_shard(tmp, ShardId(name, kind, version), specs, tensors)
            os.replace(tmp, self.path / file)
        except OSError as error:
            with suppress(FileNotFoundError):
                tmp.unlink()
            outcome = (
                "the partial store is removed"
                if version == 0
                else f"the store stays at its last committed step {self.step}"
            )
            raise SctError(f"shard {name}: {_io_problem(error)} while writing {self.path / file}; {outcome}") from None
        self.checksums.remember(self.path / file, os.stat(self.path / file), written.crc32)
        with self._mutex:
            self.bytes_written += written.bytes
        return ShardEntry(name, kind, file, version, written.bytes, written.crc32, specs)

    def commit(self, step: int, state: dict | None = None, extra: dict | None = None) -> None:
        """Make every pending shard version and `state` (and `extra`, when given: the manifest's `extra` replaced
        whole) the committed state at `step`, atomically.

        Shards not written since the last commit keep their committed version. On any failure (full disk
        included) the store stays at its previous step and the pending versions are kept, so the commit can
        be retried after freeing space, or dropped with `discard`.
        """
        self.prepare_commit(step, state, extra)
        self.finish_prepared()

    def prepare_commit(self, step: int, state: dict | None = None, extra: dict | None = None) -> None:
        """Phase one of a commit: the new manifest is made durable beside the current one (`PREPARED`), but
        the store stays at its committed step until `finish_prepared` (or a restart's `abort_prepared`).

        Replicas that must commit the same step together prepare, meet, and then finish; a crash between the
        phases leaves a prepared step that the next start keeps or drops (`sct_edge.parallel.coordination`).
        """
        self._require_lock()
        if step < self.step:
            raise SctError(f"commit step {step} is before the committed step {self.step} of store {self.path}")
        if state is not None and not isinstance(state, dict):
            raise SctError(f"commit state must be a dict, not {type(state).__name__}")
        with self._mutex:
            new = copy.copy(self._manifest)
            new.shards = {**self._manifest.shards, **self._pending}
            new.step, new.generation = int(step), self._manifest.generation + 1
            new.state = copy.deepcopy(self._manifest.state if state is None else state)
            if extra is not None:
                new.extra = copy.deepcopy(extra)
            new.written_by = SCT_EDGE_VERSION
            raw = new.to_bytes()
        try:
            fsync_dir(self.path)  # the renames that put the pending versions in place
            atomic_write(self.path / PREPARED, raw)
        except OSError as error:
            raise SctError(
                f"{self.path / MANIFEST}: {_io_problem(error)} while committing step {step}; the store "
                f"stays at step {self.step} (pending shards kept: free space and commit again, or "
                f"discard)"
            ) from None
        with self._mutex:
            self._prepared, self._prepared_raw = new, raw
            self.bytes_written += len(raw)

    def prepared_step(self) -> int | None:
        """The step of a prepared, not yet finished commit (None when there is none)."""
        return None if self._prepared is None else self._prepared.step

    def finish_prepared(self) -> None:
        """Phase two: the prepared manifest becomes the committed one (an atomic rename)."""
        self._require_lock()
        new = self._prepared
        if new is None:
            raise SctError(f"store {self.path} has no prepared commit to finish")
        try:
            os.replace(self.path / PREPARED, self.path / MANIFEST)
            fsync_dir(self.path)
        except OSError as error:
            raise SctError(f"{self.path / MANIFEST}: {_io_problem(error)} while committing step {new.step}; "
                           f"the store stays at step {self.step}") from None
        with self._mutex:
            superseded = [e.file for n, e in self._manifest.shards.items() if new.shards[n].file != e.file]
            self._manifest, self._raw, self._prepared = new, self._prepared_raw, None
            self._pending = {n: e for n, e in self._pending.items() if new.shards[n].file != e.file}
        for file in superseded:
            self._delete(file)

    def abort_prepared(self) -> None:
        """Drop a prepared commit and the shard versions only it names: the store stays at its committed step."""
        self._require_lock()
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            return
        self._delete(PREPARED)
        committed = {e.file for e in self._manifest.shards.values()}
        with self._mutex:
            self._pending = {n: e for n, e in self._pending.items() if e.file in committed}
        for entry in prepared.shards.values():
            if entry.file not in committed:
                self._delete(entry.file)

    def add_outer_state(self) -> None:
        """Give the store DiLoCo outer-state shards: the anchor is the committed weights, the momentum zero.

        Committed at once at the store's step; the weights, moments and run state are unchanged.
        """
        self._require_lock()
        if self._manifest.extra.get("outer_state"):
            return
        if self._pending or self._prepared is not None:
            raise SctError(f"store {self.path}: outer state can be added only with nothing uncommitted")
        layout = store_layout(self.config, self._manifest.state_dtype, outer=True)
        entries = {}
        for name in self.weight_shard_names():
            weights = self.read(name)
            tensors = {}
            for key, value in weights.items():
                tensors[f"{key}.anchor"] = value.float()
                tensors[f"{key}.momentum"] = torch.zeros(value.shape, dtype=torch.float32)
            kind, specs = layout[outer_shard(name)]
            entries[outer_shard(name)] = self._write_version(outer_shard(name), kind, specs, tensors,
                                                             self.generation + 1)
            del weights, tensors
            self.release(name)
        before = self._manifest
        with self._mutex:
            self._manifest = copy.copy(before)
            self._manifest.shards = {**before.shards, **entries}
            self._manifest.extra = {**before.extra, "outer_state": True}
        try:
            self.commit(self.step)
        except SctError:
            with self._mutex:
                self._manifest = before
            for entry in entries.values():
                self._delete(entry.file)
            raise

    def discard(self) -> None:
        """Drop every uncommitted shard version (their files are deleted; mapped views stay readable)."""
        with self._mutex:
            pending, self._pending = self._pending, {}
            for name, entry in pending.items():
                mapped = self._maps.get(name)
                if mapped is not None and mapped.path.name == entry.file:
                    self._maps.pop(name).release()
        for entry in pending.values():
            self._delete(entry.file)

    def _delete(self, file: str) -> None:
        """Delete store file `file` (gone already is fine) and forget that it was checksummed."""
        with suppress(FileNotFoundError):
            os.unlink(self.path / file)
        self.checksums.forget(self.path / file)

    # ---------------------------------------------------------------- integrity

    def verify(self) -> VerifyReport:
        """Full check of the committed state: every shard's header and crc32, and the tokenizer.

        Raises SctError naming the first bad shard; modifies nothing.
        """
        start = time.perf_counter()
        total = 0
        buf = bytearray(8 * 2**20)
        for name, entry in self._manifest.shards.items():
            header = self._stat_header(name, entry)
            self._check_header(name, entry, header)
            path = self.path / entry.file
            crc, data_crc, size = file_crc32(path, header.data_start, buf)
            total += size
            label = self._label(name, entry)
            if crc != entry.crc32:
                raise SctError(
                    f"{label}: checksum mismatch: crc32 {crc:08x}, the manifest records "
                    f"{entry.crc32:08x} (the file is corrupt)"
                )
            if data_crc != header.data_crc32:
                raise SctError(
                    f"{label}: data crc32 {data_crc:08x} differs from the {header.data_crc32:08x} in its own metadata"
                )
            self.checksums.remember(path, os.stat(path), crc)
        self.tokenizer_json()
        total += self._manifest.tokenizer["bytes"]
        return VerifyReport(len(self._manifest.shards), total, time.perf_counter() - start, self.step)

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Release every mapping, delete uncommitted versions and drop the write lock."""
        if self._lock_fd is not None:
            self.discard()
        with self._mutex:
            maps, self._maps = self._maps, {}
        for mapped in maps.values():
            mapped.release()
        self._release_lock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        path: str | Path,
        config: ModelConfig,
        *,
        seed: int = 0,
        state_dtype: torch.dtype | str = torch.float32,
        tokenizer_json: str | None = None,
        extra: dict | None = None,
        tensors: Callable[[str], dict[str, Tensor]] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> Store:
        """Create a store at `path` (a new or empty directory), streaming one shard at a time.

        Weights come from `tensors(name)` for every weights shard (default: the random init of
        `initial_tensors(config, seed, name)`, equal to `Transformer(config, seed=seed)`); an importer
        passes its own. AdamW moments start at zero. `progress(name, bytes_done, bytes_total)` is called
        after each shard. The returned store holds the write lock; `create_stats` says what it cost.
        """
        start = time.perf_counter()
        path = Path(path)
        config.validate()
        dtype_name = _state_dtype_name(state_dtype)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise SctError(f"{path} already exists and is not empty: a store is created in a new or empty directory")
        tokenizer_json = ByteTokenizer().to_json() if tokenizer_json is None else tokenizer_json
        extra = {} if extra is None else extra
        source = tensors or (lambda name: initial_tensors(config, seed, name))
        layout = store_layout(config, dtype_name)
        total = sum(s.nbytes for _, specs in layout.values() for s in specs.values()) + 4096 * len(layout)
        made_dir = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SctError(f"cannot create store directory {path}: {error.strerror}") from None
        free = shutil.disk_usage(path).free
        if free < total:
            if made_dir:
                path.rmdir()
            raise SctError(f"{path}: the store needs {total / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free")
        lock_fd = _take_lock(path)
        manifest = Manifest(
            config=config,
            seed=seed,
            state_dtype=dtype_name,
            tokenizer={},
            step=0,
            generation=0,
            state={},
            extra=extra,
            shards={},
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        builder = cls(path, manifest, b"")
        stats = CreateStats()
        try:
            data = tokenizer_json.encode()
            atomic_write(path / TOKENIZER, data)
            manifest.tokenizer = {"file": TOKENIZER, "bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
            builder._stream_shards(layout, source, stats, total, progress)
            atomic_write(path / MANIFEST, manifest.to_bytes())
        except BaseException:
            for item in path.iterdir():
                if item.name != LOCK:
                    with suppress(FileNotFoundError):
                        item.unlink()
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
            with suppress(FileNotFoundError):
                (path / LOCK).unlink()
            if made_dir:
                with suppress(OSError):
                    path.rmdir()
            raise
        store = cls.open(path, builder.checksums)
        store._lock_fd = lock_fd
        stats.seconds = time.perf_counter() - start
        stats.bytes = store.committed_bytes()
        stats.shards = len(layout)
        store.bytes_written = builder.bytes_written + len(store._raw)
        store.create_stats = stats
        return store

    def _stream_shards(
        self,
        layout: dict[str, tuple[str, dict[str, TensorSpec]]],
        source: Callable[[str], dict[str, Tensor]],
        stats: CreateStats,
        total: int,
        progress: Callable[[str, int, int], None] | None,
    ) -> None:
        """Write version 0 of every shard: build a part while the previous one is written (two parts in RAM)."""
        done = 0

        def write(name: str, tensors: dict[str, Tensor] | None) -> ShardEntry:
            t0 = time.perf_counter()
            kind, specs = layout[name]
            entry = self._write_version(name, kind, specs, tensors, 0)
            stats.write_seconds += time.perf_counter() - t0
            if tensors is not None:
                stats.data_bytes_written += entry.bytes
            return entry

        def finish(future) -> None:
            nonlocal done
            for entry in future.result():
                self._manifest.shards[entry.name] = entry
                done += entry.bytes
                if progress is not None:
                    progress(entry.name, done, total)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sct-store-create") as pool:
            future = None
            for name, (kind, specs) in layout.items():
                if kind != "weights":
                    continue
                t0 = time.perf_counter()
                tensors = source(name)
                _check_tensors(name, specs, tensors)
                stats.generate_seconds += time.perf_counter() - t0
                if future is not None:
                    finish(future)
                optim = optim_shard(name)
                future = pool.submit(lambda n=name, t=tensors, o=optim: [write(n, t), write(o, None)])
                del tensors
            if future is not None:
                finish(future)
        # manifest order is the layout order, whatever order the shards finished in
        self._manifest.shards = {name: self._manifest.shards[name] for name in layout}


def _check_tensors(name: str, specs: dict[str, TensorSpec], tensors: dict[str, Tensor]) -> None:
    if set(tensors) != set(specs):
        missing = sorted(set(specs) - set(tensors))
        unexpected = sorted(set(tensors) - set(specs))
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        raise SctError(f"initial tensors for shard {name} do not match the layout ({what})")
    for key, spec in specs.items():
        if tuple(tensors[key].shape) != spec.shape:
            raise SctError(
                f"initial tensor {key} of shard {name} has shape {list(tensors[key].shape)}, "
                f"expected {list(spec.shape)}"
            )


def _state_dtype_name(dtype: torch.dtype | str) -> str:
    for name, value in STATE_DTYPES.items():
        if dtype in (name, value):
            return name
    raise SctError(f"optimizer state dtype {dtype} is not supported (use {' or '.join(STATE_DTYPES)})")


def _take_lock(path: Path) -> int:
    """An fd holding an exclusive flock on STORE/lock, with our pid written in it."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise SctError(f"store {path}: cannot open the lock file: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SctError(f"store {path} is being trained by another process (pid {pid})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
