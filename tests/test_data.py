"""Tests of the training data module: corpus discovery and split, the token cache, batch sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sct_edge.convert.tokenizer import BPETokenizer, ByteTokenizer
from sct_edge.errors import SctError
from sct_edge.train.data import (
    META_FILE,
    TRAIN_FILE,
    VAL_FILE,
    BatchSampler,
    eval_batches,
    prepare_corpus,
    stdlib_documents,
)


class GenericByteTokenizer(ByteTokenizer):
    """The byte tokenizer under another kind, so the data module takes its generic `encode` path."""

    kind = "bytes-generic"

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind})


class WideTokenizer(ByteTokenizer):
    """Bytes shifted above 65535 with an end-of-text id: needs uint32 tokens and eos joins."""

    kind = "wide"
    vocab_size = 70_000
    eos_id = 69_999
    SHIFT = 65_500

    def encode(self, text: str) -> list[int]:
        return [b + self.SHIFT for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) - self.SHIFT for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind})


class FailingTokenizer(ByteTokenizer):
    """Raises partway through the build, as a killed process would stop mid-write."""

    kind = "failing"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        if self.calls > 2:  # the first call encodes the "\n\n" separator
            raise KeyboardInterrupt
        return super().encode(text)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind})


def write_docs(root: Path, n: int, lines: int = 20) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"doc{i:03d}.txt"
        path.write_text("".join(f"document {i} line {j}: the quick brown fox\n" for j in range(lines)))
        paths.append(path)
    return paths


def decoded(tokens: np.ndarray) -> str:
    return bytes(tokens.tolist()).decode("utf-8")


def test_default_corpus_is_found_and_split_by_document(tmp_path: Path) -> None:
    label, docs = stdlib_documents()
    names = {d.name for d in docs}
    assert "argparse.py" in names and "json/decoder.py" in names
    for name in names:
        parts = name.split("/")
        assert not {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"} & set(parts[:-1]), name
    assert [d.name for d in docs] == sorted(names)

    corpus = prepare_corpus(None, ByteTokenizer(), tmp_path / "a", max_bytes=1_500_000)
    meta = corpus.meta
    assert meta.split == "documents" and meta.source == label
    assert meta.val_documents and not set(meta.train_documents) & set(meta.val_documents)
    assert set(meta.train_documents) | set(meta.val_documents) <= names
    assert 1_400_000 < meta.text_bytes <= 1_500_000
    # Byte tokens: one per byte of text plus the two-byte "\n\n" separator after each document.
    n_docs = len(meta.train_documents) + len(meta.val_documents)
    assert meta.train_tokens + meta.val_tokens == meta.text_bytes + 2 * n_docs
    assert corpus.train.dtype == np.uint16 and len(corpus.val) == meta.val_tokens
    paths = {d.name: d.path for d in docs}
    first_val = paths[meta.val_documents[0]].read_text()
    assert decoded(corpus.val).startswith(first_val + "\n\n")
    largest_val = max((paths[name].read_text() for name in meta.val_documents), key=len)
    assert largest_val in decoded(corpus.val) and largest_val not in decoded(corpus.train)

    again = prepare_corpus(None, ByteTokenizer(), tmp_path / "b", max_bytes=1_500_000)
    assert again.rebuilt and np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)
    assert "train" in corpus.describe() and f"{meta.train_tokens:,}" in corpus.describe()


def test_cache_is_reused_then_rebuilt_when_a_source_changes(tmp_path: Path) -> None:
    paths = write_docs(tmp_path / "data", 3)
    cache = tmp_path / "cache"
    first = prepare_corpus([tmp_path / "data"], ByteTokenizer(), cache)
    assert first.rebuilt
    mtime = (cache / TRAIN_FILE).stat().st_mtime_ns

    second = prepare_corpus([tmp_path / "data"], ByteTokenizer(), cache)
    assert not second.rebuilt and "cache reused" in second.describe()
    assert (cache / TRAIN_FILE).stat().st_mtime_ns == mtime
    assert np.array_equal(second.train, first.train)

    paths[1].write_text(paths[1].read_text() + "an added line about zebras\n")
    third = prepare_corpus([tmp_path / "data"], ByteTokenizer(), cache)
    assert third.rebuilt
    assert "zebras" in decoded(third.train) + decoded(third.val)

    fourth = prepare_corpus([tmp_path / "data"], GenericByteTokenizer(), cache)
    assert fourth.rebuilt, "another tokenizer must not reuse the cache"
    assert np.array_equal(fourth.train, third.train), "generic encode path must equal the numpy fast path"
    assert prepare_corpus([tmp_path / "data"], GenericByteTokenizer(), cache, val_fraction=0.1).rebuilt


def test_leftover_temp_files_are_cleaned_and_never_trusted(tmp_path: Path) -> None:
    write_docs(tmp_path / "data", 3)
    cache = tmp_path / "cache"
    corpus = prepare_corpus([tmp_path / "data"], ByteTokenizer(), cache)
    # A copy: truncating a mapped file below would make reads through the old map fault.
    train = np.array(corpus.train)
    leftover = cache / f"{TRAIN_FILE}.tmp.99999"
    leftover.write_bytes(b"half written")
    reused = prepare_corpus([tmp_path / "data"], ByteTokenizer(), cache)
    assert not reused.rebuilt and not leftover.exists()
    assert np.array_equal(reused.train, train)
    del corpus, reused

    # A token file that does not match its meta (a torn write) is rebuilt, not trusted.
    with open(cache / TRAIN_FILE, "r+b") as f:
        f.truncate(10)
    repaired = prepare_corpus([tmp_path / "data"], ByteTokenizer(), cache)
    assert repaired.rebuilt and np.array_equal(repaired.train, train)


def test_interrupted_build_leaves_no_trusted_cache(tmp_path: Path) -> None:
    write_docs(tmp_path / "data", 3)
    cache = tmp_path / "cache"
    prepare_corpus([tmp_path / "data"], ByteTokenizer(), cache)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([tmp_path / "data"], FailingTokenizer(), cache)
    assert not (cache / META_FILE).exists()
    assert sorted(p.name for p in cache.iterdir()) == [TRAIN_FILE, VAL_FILE]
    assert prepare_corpus([tmp_path / "data"], ByteTokenizer(), cache).rebuilt


def test_single_file_holds_out_its_tail_at_a_line_boundary(tmp_path: Path) -> None:
    (path,) = write_docs(tmp_path, 1, lines=200)
    corpus = prepare_corpus([path], ByteTokenizer(), tmp_path / "cache")
    train, val = decoded(corpus.train), decoded(corpus.val)
    assert corpus.meta.split == "tail"
    assert train.endswith("\n\n") and val.endswith("\n\n")
    assert train[:-2] + val[:-2] == path.read_text()
    assert val.startswith("document 0 line ")
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.04


def test_few_documents_are_each_split_by_tail(tmp_path: Path) -> None:
    paths = write_docs(tmp_path / "data", 3, lines=100)
    corpus = prepare_corpus([tmp_path / "data"], ByteTokenizer(), tmp_path / "cache")
    assert corpus.meta.split == "tail"
    train, val = decoded(corpus.train), decoded(corpus.val)
    for path in paths:
        text = path.read_text()
        lines = text.splitlines(keepends=True)
        assert lines[0] in train and lines[-1] in val and lines[-1] not in train


def test_wide_vocabulary_uses_uint32_and_eos_between_documents(tmp_path: Path) -> None:
    paths = write_docs(tmp_path / "data", 60, lines=2)
    tok = WideTokenizer()
    corpus = prepare_corpus([tmp_path / "data"], tok, tmp_path / "cache")
    assert corpus.train.dtype == np.uint32 and corpus.meta.split == "documents"
    ids = np.asarray(corpus.train)
    assert ids.max() == tok.eos_id and ids.min() >= tok.SHIFT
    pieces = [tok.decode(p.tolist()) for p in np.split(ids, np.flatnonzero(ids == tok.eos_id) + 1)[:-1]]
    expected = {p.read_text() for p in paths if f"data/{p.name}" in corpus.meta.train_documents}
    assert set(pieces) == expected and len(pieces) == len(corpus.meta.train_documents)


def test_bpe_tokenizer_documents_end_with_its_eos(tmp_path: Path, toy_bpe) -> None:
    paths = write_docs(tmp_path / "data", 2, lines=30)
    tok = BPETokenizer(toy_bpe, eos_id=toy_bpe.token_to_id("<|endoftext|>"))
    corpus = prepare_corpus([tmp_path / "data"], tok, tmp_path / "cache")
    for tokens in (corpus.train, corpus.val):
        ids = np.asarray(tokens).tolist()
        assert ids[-1] == tok.eos_id and ids.count(tok.eos_id) == len(paths)
    text = tok.decode(corpus.train.tolist()) + tok.decode(corpus.val.tolist())
    assert sorted(text.splitlines()) == sorted(line for p in paths for line in p.read_text().splitlines())


def test_max_bytes_caps_the_text_at_line_ends(tmp_path: Path) -> None:
    paths = write_docs(tmp_path / "data", 80, lines=5)  # about 16 kB
    corpus = prepare_corpus([tmp_path / "data"], ByteTokenizer(), tmp_path / "cache", max_bytes=12_000)
    # Enough documents to split by document, so only the cap can have cut one.
    assert corpus.meta.split == "documents"
    assert 11_800 < corpus.meta.text_bytes <= 12_000
    source_lines = {line for p in paths for line in p.read_text().splitlines()}
    taken = (decoded(corpus.train) + decoded(corpus.val)).splitlines()
    assert {line for line in taken if line} <= source_lines, "a document was cut inside a line"
    (single,) = write_docs(tmp_path / "one", 1, lines=300)
    cut = prepare_corpus([single], ByteTokenizer(), tmp_path / "cache", max_bytes=5_000)
    assert 4_950 < cut.meta.text_bytes <= 5_000
    assert decoded(cut.train)[:-2] + decoded(cut.val)[:-2] == single.read_text()[: cut.meta.text_bytes]
    assert decoded(cut.val).endswith("fox\n\n\n"), "the cap must cut at a line end"
    full = prepare_corpus([tmp_path / "data"], ByteTokenizer(), tmp_path / "cache", max_bytes=None)
    assert full.rebuilt and full.meta.text_bytes == sum(p.stat().st_size for p in paths)


def test_user_data_errors_name_the_path(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(SctError, match=str(missing)):
        prepare_corpus([missing], ByteTokenizer(), cache)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(SctError, match=f"{empty_dir} contains no text files"):
        prepare_corpus([empty_dir], ByteTokenizer(), cache)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 10)
    with pytest.raises(SctError, match=f"{binary} is not UTF-8 text"):
        prepare_corpus([binary], ByteTokenizer(), cache)
    with pytest.raises(SctError, match="outside"):
        prepare_corpus(None, ByteTokenizer(), cache, val_fraction=0.0)


def test_binary_files_inside_a_directory_are_skipped(tmp_path: Path) -> None:
    write_docs(tmp_path / "data", 2)
    (tmp_path / "data" / "image.txt").write_bytes(b"\x89PNG\x00\x00garbage")
    (tmp_path / "data" / "notes.bin").write_text("wrong extension, never read")
    (tmp_path / "data" / "README").write_text("no extension but text\n")
    corpus = prepare_corpus([tmp_path / "data"], ByteTokenizer(), tmp_path / "cache")
    assert corpus.meta.skipped_files == ["data/image.txt"]
    assert "no extension but text" in decoded(corpus.train) + decoded(corpus.val)
    assert "never read" not in decoded(corpus.train) + decoded(corpus.val)

    only_binary = tmp_path / "binary"
    only_binary.mkdir()
    (only_binary / "x.txt").write_bytes(b"\xff\xff\xff")
    with pytest.raises(SctError, match=f"{only_binary}: no text found"):
        prepare_corpus([only_binary], ByteTokenizer(), tmp_path / "cache2")


def test_too_short_corpus_says_how_many_tokens_are_needed(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("a few words\nand a second line\n")
    corpus = prepare_corpus([path], ByteTokenizer(), tmp_path / "cache")
    with pytest.raises(SctError, match=rf"{path} has {len(corpus.train)} tokens; .* needs 129"):
        BatchSampler(corpus.train, batch_size=2, seq_len=128, seed=0, name=str(path))
    with pytest.raises(SctError, match=rf"validation data has {len(corpus.val)} tokens"):
        eval_batches(corpus.val, seq_len=64, batch_size=2)


def test_sampler_is_deterministic_and_y_is_x_shifted() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    sampler, same = BatchSampler(tokens, 4, 16, seed=7), BatchSampler(tokens, 4, 16, seed=7)
    other = BatchSampler(tokens, 4, 16, seed=8)
    batches = [next(sampler) for _ in range(5)]
    for (x, y), (x2, y2) in zip(batches, (next(same) for _ in range(5)), strict=True):
        assert x.dtype == torch.int64 and x.shape == (4, 16)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(y, x + 1)  # tokens are arange, so the next token is the value plus one
    assert not all(torch.equal(b[0], next(other)[0]) for b in batches)


def test_sampler_epoch_covers_non_overlapping_windows() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = BatchSampler(tokens, 1, 16, seed=3)
    starts = []
    while sampler.epoch == 0:
        starts.append(int(next(sampler)[0][0, 0]))
    offset = min(starts)
    assert offset < 16
    assert sorted(starts) == list(range(offset, 1000 - 16, 16))
    assert starts != sorted(starts)


def test_sampler_resume_draws_the_same_batches() -> None:
    tokens = np.arange(500, dtype=np.uint16)
    for n, m in ((3, 10), (0, 4), (11, 9)):  # windows per epoch are ~31 / 8 = 3: resumes cross epochs
        running = BatchSampler(tokens, 8, 16, seed=11)
        for _ in range(n):
            next(running)
        state = json.loads(json.dumps(running.state_dict()))
        expected = [next(running) for _ in range(m)]
        resumed = BatchSampler(tokens, 8, 16, seed=11)
        resumed.load_state_dict(state)
        for (x, y), (x2, y2) in zip(expected, (next(resumed) for _ in range(m)), strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(SctError, match="seq_len=16 but this run has 32"):
        BatchSampler(tokens, 8, 32, seed=11).load_state_dict(state)


def test_eval_windows_cover_tokens_in_order_without_overlap() -> None:
    tokens = np.arange(1001, dtype=np.uint16)
    batches = list(eval_batches(tokens, seq_len=32, batch_size=5))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert xs.shape == (1000 // 32, 32) and [len(x) for x, _ in batches][-1] == (1000 // 32) % 5
    assert torch.equal(xs.flatten(), torch.arange(len(xs) * 32))
    assert torch.equal(ys, xs + 1)
    assert sum(len(x) for x, _ in eval_batches(tokens, 32, 5, max_windows=7)) == 7
    assert len(list(eval_batches(np.arange(33), 32, 5))) == 1
