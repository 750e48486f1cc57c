"""Training data: the corpus (embedded default or the user's files), its token cache, and batch sampling.

The embedded default corpus is the Python standard library's own source: real text that every machine
running sct-edge already has, so training works with no download. User data is a list of text files
and directories. Either way the text is split into train and held-out validation (by document when
there are enough documents, else by taking each document's tail at a line boundary, so validation text
is never trained on; or the user's own validation files), tokenised once, document by document, into
memory-mapped token files, and reused until a source file, the tokenizer or the split settings change.

JSONL files are examples, not text: `prepare_training_data` sends them to `sct_edge.train.examples`
(right-padded examples with loss masks) and plain text here; both give the trainer the same methods
(`sampler`, `eval_batches`, `sample_prompt`, `describe`, `summary`).

`BatchSampler` draws training windows in an order that is a pure function of (seed, cursor), so a
resumed run draws exactly the batches an uninterrupted one would; `eval_batches` walks the validation
tokens in non-overlapping windows for loss and perplexity.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sct_edge.convert.tokenizer import Tokenizer
from sct_edge.errors import SctError
from sct_edge.store.atomic import AtomicFile, atomic_write
from sct_edge.train.examples import ExampleData, ExampleSampler, prepare_examples
from sct_edge.train.jsonl import is_jsonl

DEFAULT_MAX_BYTES = 8_000_000
DEFAULT_VAL_FRACTION = 0.02
# Bump when the cache layout or the way text becomes tokens changes, so old caches are rebuilt.
CACHE_FORMAT = 1

TEXT_SUFFIXES = frozenset({".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".html", ".tex", ""})
# Directories of the standard library that are not representative source (tests, vendored
# packages, demos, bundled wheels) or are not there on every build.
STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "idlelib",
        "lib2to3",
        "__pycache__",
        "ensurepip",
        "turtledemo",
    }
)
# Walking a user directory never descends into these: caches and VCS internals are not training text.
SKIPPED_USER_DIRS = frozenset({"__pycache__", "node_modules"})
DOCUMENT_SEPARATOR = "\n\n"
# Large documents are encoded in pieces of about this many characters, cut at line ends, so that a
# single big file never becomes one huge Python list of ints.
ENCODE_CHUNK_CHARS = 1 << 22

TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
META_FILE = "meta.json"
TMP_MARK = ".tmp."


@dataclass(frozen=True)
class Document:
    """One source file: `name` is stable across machines (relative path) and decides its split."""

    name: str
    path: Path
    size: int
    mtime_ns: int
    # Named directly by the user: text that is not UTF-8 is an error there, a silent skip in a directory.
    explicit: bool = False


@dataclass
class CorpusMeta:
    """What `meta.json` records beside the token files; the cache is trusted only when `key` matches."""

    key: str
    source: str
    split: str  # "documents", "tail" or "given" (the user's validation files)
    dtype: str
    vocab_size: int
    train_tokens: int
    val_tokens: int
    text_bytes: int
    train_documents: list[str]
    val_documents: list[str]
    skipped_files: list[str]
    tokenize_seconds: float
    format: int = CACHE_FORMAT

    @property
    def tokens_per_second(self) -> float:
        return (self.train_tokens + self.val_tokens) / max(self.tokenize_seconds, 1e-9)


@dataclass
class Corpus:
    """Train and validation tokens as read-only memory maps, with the meta that describes them."""

    train: np.memmap
    val: np.memmap
    meta: CorpusMeta
    cache_dir: Path
    rebuilt: bool  # True when this call tokenised; False when the cache was reused

    def describe(self) -> str:
        m = self.meta
        if m.split in ("documents", "given"):
            docs = f"{len(m.train_documents)} train / {len(m.val_documents)} validation documents"
        else:
            docs = f"{len(m.train_documents)} documents, the end of each held out for validation"
        skipped = f", {len(m.skipped_files)} non-text files skipped" if m.skipped_files else ""
        how = (
            f"tokenised in {m.tokenize_seconds:.2f} s ({m.tokens_per_second:,.0f} tokens/s)"
            if self.rebuilt
            else "cache reused"
        )
        return (
            f"{m.source}: {docs}{skipped}, {m.text_bytes:,} bytes of text -> "
            f"{m.train_tokens:,} train + {m.val_tokens:,} val tokens ({m.dtype}), {how}, in {self.cache_dir}"
        )

    def summary(self) -> dict[str, Any]:
        """For the start event: what the run trains on, in numbers."""
        m = self.meta
        return {"kind": "text", "split": m.split, "train_tokens": m.train_tokens, "val_tokens": m.val_tokens}

    def sampler(self, batch_size: int, seq_len: int, seed: int) -> BatchSampler:
        return BatchSampler(self.train, batch_size, seq_len, seed)

    def eval_seq(self, seq_len: int) -> tuple[int, str | None]:
        """The window length validation uses: `seq_len`, or, when the validation text is shorter than one
        window, one window over all of it, with a note that says so (checked before the first step)."""
        n = len(self.val)
        if n >= seq_len + 1:
            return seq_len, None
        if n < 2:
            raise SctError(f"{self.meta.source}: the validation data has {n} tokens; it needs at least 2 "
                           "(pass more text, or --val-data FILE)")
        return n - 1, (f"the validation data has {n} tokens, fewer than one window of sequence length {seq_len} "
                       f"needs ({seq_len + 1}): validation uses one window of {n - 1}")

    def eval_batches(self, seq_len: int, batch_size: int, max_windows: int | None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return eval_batches(self.val, self.eval_seq(seq_len)[0], batch_size, max_windows)

    def sample_prompt(self) -> list[int]:
        """The first tokens of the validation text, for a sample of what the model writes after them."""
        return [int(t) for t in self.val[:32]]


def _stable_fraction(name: str, salt: str) -> float:
    """A number in [0, 1) fixed by `name`: the same on every machine and Python (unlike `hash`)."""
    digest = hashlib.blake2b(f"{salt}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _document(path: Path, name: str, explicit: bool = False) -> Document:
    st = path.stat()
    return Document(name=name, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns, explicit=explicit)


def stdlib_documents() -> tuple[str, list[Document]]:
    """The embedded corpus: every `.py` file of this interpreter's standard library, minus tests,
    vendored and demo packages; returns a label and the documents sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise SctError(f"the Python standard library was not found at {root}; pass --data with your own text")
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and not d.startswith(("config-", "."))]
        for filename in filenames:
            if filename.endswith(".py"):
                path = Path(dirpath) / filename
                doc = _document(path, path.relative_to(root).as_posix())
                # Empty files (many an __init__.py) add nothing and must not be picked for validation.
                if doc.size:
                    docs.append(doc)
    docs.sort(key=lambda d: d.name)
    if not docs:
        raise SctError(f"no Python source found in the standard library at {root}; pass --data with your own text")
    label = f"python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro} stdlib"
    return label, docs


def user_documents(sources: list[Path]) -> list[Document]:
    """The files behind the user's paths: a file as named, a directory walked for text files."""
    docs: dict[Path, Document] = {}
    for source in sources:
        source = Path(source)
        if not source.exists():
            raise SctError(f"data path {source} does not exist")
        if source.is_file():
            if source.stat().st_size == 0:
                raise SctError(f"data file {source} is empty")
            docs.setdefault(source.resolve(), _document(source, source.name, explicit=True))
        elif source.is_dir():
            found = 0
            for dirpath, dirnames, filenames in os.walk(source):
                dirnames[:] = [d for d in dirnames if d not in SKIPPED_USER_DIRS and not d.startswith(".")]
                for filename in filenames:
                    path = Path(dirpath) / filename
                    if filename.startswith(".") or path.suffix.lower() not in TEXT_SUFFIXES or not path.is_file():
                        continue
                    doc = _document(path, f"{source.resolve().name}/{path.relative_to(source).as_posix()}")
                    if doc.size:
                        docs.setdefault(path.resolve(), doc)
                        found += 1
            if not found:
                raise SctError(
                    f"data directory {source} contains no text files "
                    f"({', '.join(sorted(s for s in TEXT_SUFFIXES if s))} or without extension)"
                )
        else:
            raise SctError(f"data path {source} is neither a file nor a directory")
    return sorted(docs.values(), key=lambda d: d.name)


def select_documents(docs: list[Document], max_bytes: int | None) -> list[tuple[Document, int | None]]:
    """Whole documents, in a fixed pseudo-random order, while they fit in `max_bytes`.

    A pseudo-random rather than alphabetical order keeps a capped corpus as varied as the whole. Only
    when not even one document fits is the first one cut (at a line end, when reading it). Each entry is
    (document, byte limit or None for all of it), sorted by name again."""
    if max_bytes is None or sum(d.size for d in docs) <= max_bytes:
        return [(d, None) for d in docs]
    order = sorted(docs, key=lambda d: _stable_fraction(d.name, "select"))
    chosen: list[tuple[Document, int | None]] = []
    left = max_bytes
    for doc in order:
        if doc.size <= left:
            chosen.append((doc, None))
            left -= doc.size
    return sorted(chosen, key=lambda c: c[0].name) or [(order[0], max_bytes)]


def _read_text(doc: Document, limit: int | None) -> tuple[str | None, int]:
    """The document's text (its first `limit` bytes, cut at a line end), None when it is not UTF-8
    text, and the number of bytes read."""
    with open(doc.path, "rb") as f:
        data = f.read() if limit is None else f.read(limit)
    if limit is not None and len(data) == limit:
        cut = data.rfind(b"\n")
        if cut > 0:
            data = data[: cut + 1]
    if b"\x00" in data:
        text = None
    else:
        try:
            # An incremental decoder with final=False drops a multi-byte character cut by the limit
            # instead of calling it invalid.
            text = codecs.getincrementaldecoder("utf-8")().decode(data, final=limit is None)
        except UnicodeDecodeError:
            text = None
    if text is None and doc.explicit:
        raise SctError(f"data file {doc.path} is not UTF-8 text")
    return text, len(data)


def _tail_cut(text: str, val_fraction: float) -> int:
    """Where validation starts in a document split by position: about `val_fraction` from the end, moved
    back to a line start when one is near enough."""
    cut = len(text) - max(1, round(len(text) * val_fraction))
    line_start = text.rfind("\n", 0, cut) + 1
    return line_start if line_start > cut // 2 else cut


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


class _TokenWriter:
    """Appends token arrays to a temporary file; `commit` makes it durable and renames it into place."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.out = AtomicFile(path, path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}"))
        self.dtype = dtype
        self.count = 0

    def write(self, tokens: np.ndarray) -> None:
        self.out.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.count += len(tokens)

    def commit(self) -> None:
        self.out.commit()

    def discard(self) -> None:
        self.out.discard()


class _Encoder:
    """Text -> token arrays: numpy over the UTF-8 bytes for the byte tokenizer, `encode` otherwise."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype):
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.fast = getattr(tokenizer, "kind", None) == "bytes"
        if tokenizer.eos_id is not None:
            self.separator = np.array([tokenizer.eos_id], dtype=dtype)
        else:
            self.separator = self.encode(DOCUMENT_SEPARATOR)

    def encode(self, text: str) -> np.ndarray:
        if self.fast:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(self.dtype)
        ids = np.asarray(self.tokenizer.encode(text), dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size):
            raise SctError(f"tokenizer produced ids outside its vocabulary of {self.tokenizer.vocab_size}")
        return ids.astype(self.dtype)

    def write_document(self, text: str, out: _TokenWriter) -> None:
        start = 0
        while start < len(text):
            end = min(start + ENCODE_CHUNK_CHARS, len(text))
            if end < len(text):
                line_end = text.rfind("\n", start, end)
                end = line_end + 1 if line_end >= start else end
            out.write(self.encode(text[start:end]))
            start = end
        out.write(self.separator)


def _cache_key(
    source: str, docs: list[Document], tokenizer: Tokenizer, max_bytes: int | None, val_fraction: float,
    val_docs: list[Document] | None = None,
) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "source": source,
        "files": [(d.name, str(d.path.resolve()), d.size, d.mtime_ns) for d in docs],
        "val_files": [(d.name, str(d.path.resolve()), d.size, d.mtime_ns) for d in val_docs or []],
        "tokenizer": tokenizer.to_json(),
        "max_bytes": max_bytes,
        "val_fraction": val_fraction,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _open(cache_dir: Path, meta: CorpusMeta, rebuilt: bool) -> Corpus:
    dtype = np.dtype(meta.dtype)
    train = np.memmap(cache_dir / TRAIN_FILE, dtype=dtype, mode="r", shape=(meta.train_tokens,))
    val = np.memmap(cache_dir / VAL_FILE, dtype=dtype, mode="r", shape=(meta.val_tokens,))
    return Corpus(train=train, val=val, meta=meta, cache_dir=cache_dir, rebuilt=rebuilt)


def _load_cache(cache_dir: Path, key: str) -> Corpus | None:
    """The cached corpus when meta.json names `key` and both token files have the sizes it records."""
    try:
        meta = CorpusMeta(**json.loads((cache_dir / META_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if meta.key != key or meta.format != CACHE_FORMAT:
        return None
    itemsize = np.dtype(meta.dtype).itemsize
    for filename, count in ((TRAIN_FILE, meta.train_tokens), (VAL_FILE, meta.val_tokens)):
        path = cache_dir / filename
        if not path.is_file() or path.stat().st_size != count * itemsize:
            return None
    return _open(cache_dir, meta, rebuilt=False)


def _split_documents(chosen: list[tuple[Document, int | None]], val_fraction: float) -> tuple[str, set[str]]:
    """The split mode and, for a split by document, the names of the validation documents.

    With fewer documents than 1 / val_fraction, whole held-out documents would be a far larger
    share than asked for (or none at all), so each document's tail is held out instead."""
    names = [doc.name for doc, _ in chosen]
    if len(names) < math.ceil(1 / val_fraction):
        return "tail", set()
    fractions = {name: _stable_fraction(name, "split") for name in names}
    val = {name for name, f in fractions.items() if f < val_fraction}
    return "documents", val or {min(names, key=fractions.__getitem__)}


def _build_cache(
    cache_dir: Path,
    key: str,
    source: str,
    chosen: list[tuple[Document, int | None]],
    tokenizer: Tokenizer,
    val_fraction: float,
    val_chosen: list[tuple[Document, int | None]] | None = None,
) -> Corpus:
    dtype = _dtype_for(tokenizer.vocab_size)
    encoder = _Encoder(tokenizer, dtype)
    split, val_names = ("given", set()) if val_chosen else _split_documents(chosen, val_fraction)
    entries = [(doc, limit, False) for doc, limit in chosen] + [(doc, limit, True) for doc, limit in val_chosen or []]
    # The old meta goes first: from here until the new one is renamed into place nothing is trusted.
    (cache_dir / META_FILE).unlink(missing_ok=True)
    train = _TokenWriter(cache_dir / TRAIN_FILE, dtype)
    val = _TokenWriter(cache_dir / VAL_FILE, dtype)
    train_docs: list[str] = []
    val_docs: list[str] = []
    skipped: list[str] = []
    text_bytes = 0
    started = time.perf_counter()
    try:
        for doc, limit, given_val in entries:
            text, n_bytes = _read_text(doc, limit)
            if not text:
                if text is None:
                    skipped.append(doc.name)
                continue
            text_bytes += n_bytes
            if split == "tail":
                cut = _tail_cut(text, val_fraction)
                encoder.write_document(text[:cut], train)
                encoder.write_document(text[cut:], val)
                train_docs.append(doc.name)
                val_docs.append(doc.name)
            elif given_val or doc.name in val_names:
                encoder.write_document(text, val)
                val_docs.append(doc.name)
            else:
                encoder.write_document(text, train)
                train_docs.append(doc.name)
        if not text_bytes:
            raise SctError(f"{source}: no text found (every file is empty or not UTF-8 text)")
        if not train_docs or not val_docs:
            raise SctError(
                f"{source}: nothing to hold out for validation (too little text, or the files picked "
                "for it are not UTF-8 text)"
            )
        seconds = time.perf_counter() - started
        train.commit()
        val.commit()
    except BaseException:
        train.discard()
        val.discard()
        raise
    meta = CorpusMeta(
        key=key,
        source=source,
        split=split,
        dtype=dtype.name,
        vocab_size=tokenizer.vocab_size,
        train_tokens=train.count,
        val_tokens=val.count,
        text_bytes=text_bytes,
        train_documents=train_docs,
        val_documents=val_docs,
        skipped_files=skipped,
        tokenize_seconds=seconds,
    )
    atomic_write(cache_dir / META_FILE, json.dumps(asdict(meta), indent=1).encode(),
                 cache_dir / f"{META_FILE}{TMP_MARK}{os.getpid()}")
    return _open(cache_dir, meta, rebuilt=True)


def prepare_corpus(
    sources: list[Path] | None,
    tokenizer: Tokenizer,
    cache_dir: Path,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    val_sources: list[Path] | None = None,
) -> Corpus:
    """Tokenised train/validation data for `sources` (None or empty: the embedded stdlib corpus).

    Validation is `val_sources` when given (all of `sources` is then trained on), else held out.
    `max_bytes` caps the text taken (None: all of it); the cache in `cache_dir` is reused while the
    source files (path, size, mtime), the tokenizer and these settings are unchanged."""
    if not 0 < val_fraction < 0.5:
        raise SctError(f"validation fraction {val_fraction} is outside (0, 0.5)")
    if max_bytes is not None and max_bytes < 1:
        raise SctError(f"max_bytes {max_bytes} must be positive")
    if sources:
        docs = user_documents(sources)
        label = ", ".join(str(s) for s in sources)
    else:
        label, docs = stdlib_documents()
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SctError(f"cannot create the data cache directory {cache_dir}: {error.strerror}") from error
    # A temp file left here was never renamed into place, so its build did not finish (a kill or a
    # power cut): it holds nothing trusted and would only take disk space.
    for leftover in cache_dir.glob(f"*{TMP_MARK}*"):
        leftover.unlink(missing_ok=True)
    val_docs = user_documents(val_sources) if val_sources else None
    key = _cache_key(label, docs, tokenizer, max_bytes, val_fraction, val_docs)
    cached = _load_cache(cache_dir, key)
    if cached is not None:
        return cached
    val_chosen = select_documents(val_docs, max_bytes) if val_docs else None
    return _build_cache(cache_dir, key, label, select_documents(docs, max_bytes), tokenizer, val_fraction, val_chosen)


def _jsonl_or_text(sources: list[Path], what: str) -> tuple[bool, list[Document]]:
    """Whether `sources` are JSONL example files (True) or plain text (False), and their files; a mix is refused."""
    docs = user_documents(sources)
    jsonl = [d for d in docs if is_jsonl(d.path)]
    if jsonl and len(jsonl) != len(docs):
        text = next(d for d in docs if not is_jsonl(d.path))
        raise SctError(f"{what} mixes JSONL examples ({jsonl[0].path}) and plain text ({text.path}); "
                       "train on one kind at a time")
    return bool(jsonl), docs


def prepare_training_data(
    sources: list[Path] | None,
    tokenizer: Tokenizer,
    cache_dir: Path,
    seq_len: int,
    val_sources: list[Path] | None = None,
    chat_template: str | None = None,
    template_source: str = "the store",
    train_on_prompt: bool = False,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Corpus | ExampleData:
    """The run's data: JSONL files as examples (`sct_edge.train.examples`), anything else as plain text.

    `chat_template` (None: the default ChatML) renders `messages` examples; `template_source` names where
    it came from in errors. `val_sources` must be the same kind as `sources`."""
    if not sources:
        if val_sources and _jsonl_or_text(val_sources, "--val-data")[0]:
            raise SctError("--val-data names JSONL examples but the run trains on the default text corpus")
        return prepare_corpus(None, tokenizer, cache_dir, val_fraction=val_fraction, val_sources=val_sources)
    jsonl, docs = _jsonl_or_text(sources, "--data")
    val_docs = _jsonl_or_text(val_sources, "--val-data")[1] if val_sources else []
    if val_docs and any(is_jsonl(d.path) != jsonl for d in val_docs):
        raise SctError(f"--val-data must be {'JSONL examples' if jsonl else 'plain text'} like --data")
    if not jsonl:
        return prepare_corpus(sources, tokenizer, cache_dir, val_fraction=val_fraction, val_sources=val_sources)
    return prepare_examples([d.path for d in docs], [d.path for d in val_docs], tokenizer, chat_template,
                            template_source, seq_len, val_fraction, train_on_prompt)


def _check_window(n_tokens: int, seq_len: int, batch_size: int, name: str) -> None:
    if seq_len < 1 or batch_size < 1:
        raise SctError(f"sequence length {seq_len} and batch size {batch_size} must both be at least 1")
    if n_tokens < seq_len + 1:
        raise SctError(f"{name} has {n_tokens} tokens; one window of sequence length {seq_len} needs {seq_len + 1}")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    batch = torch.from_numpy(rows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


@dataclass
class BatchSampler:
    """Random training windows `(x, y)`, each (batch_size x seq_len) int64, y being x shifted by one.

    Epoch e covers non-overlapping windows that start at a random offset in [0, seq_len), in a random
    order, both drawn from `default_rng([seed, e])`; batches run on into the next epoch. The cursor
    (epoch, position) is all the state there is, so `load_state_dict` resumes the exact sequence."""

    tokens: np.ndarray = field(repr=False)
    batch_size: int
    seq_len: int
    seed: int
    name: str = "the training data"
    epoch: int = field(default=0, init=False)
    position: int = field(default=0, init=False)
    _order: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_window(len(self.tokens), self.seq_len, self.batch_size, self.name)

    def _epoch_starts(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        # The last window must still have its shifted target token: start + seq_len < n_tokens.
        last_start = len(self.tokens) - self.seq_len - 1
        offset = int(rng.integers(0, min(self.seq_len - 1, last_start) + 1))
        starts = np.arange(offset, last_start + 1, self.seq_len, dtype=np.int64)
        return starts[rng.permutation(len(starts))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = []
        while len(starts) < self.batch_size:
            if self._order is None:
                self._order = self._epoch_starts(self.epoch)
            take = self._order[self.position : self.position + self.batch_size - len(starts)]
            starts.extend(take.tolist())
            self.position += len(take)
            if self.position == len(self._order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return _windows(self.tokens, np.asarray(starts, dtype=np.int64), self.seq_len)

    def draw(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The `n` micro-batches of one step."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        """The cursor plus what it depends on, as plain JSON values."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for name in ("seed", "batch_size", "seq_len", "n_tokens"):
            if state.get(name) != mine[name]:
                raise SctError(
                    f"sampler state was saved with {name}={state.get(name)} but this run has {mine[name]}; "
                    "resuming would not draw the same batches"
                )
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_windows: int | None = None,
    name: str = "the validation data",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows from the start of `tokens`, in order, `batch_size` at a time (the last
    batch may be smaller; a trailing partial window is dropped), at most `max_windows` of them.
    Too few tokens for one window is an error here, not at the first `next`."""
    _check_window(len(tokens), seq_len, batch_size, name)
    # A window starting at s also needs token s + seq_len as the target of its last position.
    starts = np.arange(0, len(tokens) - seq_len, seq_len, dtype=np.int64)[:max_windows]
    return (_windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, len(starts), batch_size))


# What a run trains on, and what draws its batches: plain text windows, or JSONL examples.
TrainingData = Corpus | ExampleData
Sampler = BatchSampler | ExampleSampler
