"""Parameter and byte accounting, one source of truth for memcalc, the scheduler's plan and the tests.

Counts are exact integers per component. "Dense" means every weight matrix stored as in × out; "stored"
means as the rank policy configures it (k·(in + out + 1) for a spectral matrix). Training bytes follow
the seeds' accounting: fp32 weights, gradients and two Adam moments, 16 bytes a parameter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sct_edge.model.config import ModelConfig

TRAIN_BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + two fp32 Adam moments
GB = 10**9
MB = 10**6
GiB = 2**30
MiB = 2**20

# float32 logits per chunk: 682 tokens at a 49,152 vocabulary, 261 at 128,256. Each chunk adds its own head
# gradient (113 MB for SmolLM2's tied head), so fewer, larger chunks cost less time (measured: 7 chunks of
# 1,024 tokens took 1.34x the full loss under load).
CHUNK_LOGIT_BYTES = 128 * 2**20


def chunk_tokens_for(vocab_size: int, budget_bytes: int = CHUNK_LOGIT_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits take about `budget_bytes`."""
    return max(1, budget_bytes // (4 * vocab_size))


# Element-wise passes over tokens × width tensors far larger than the cache (RMSNorm's, RoPE's) run this many
# bytes of rows at a time, a core's L2 here: a block read from memory once, its later passes find it in cache.
# llama3-8b's norm of 2,048 tokens took 5.2–5.9 ms whole and 3.0–3.1 ms in blocks of 1 or 2 MiB (3.3 at 4 MiB,
# 4.4 at 8 MiB), its RoPE of q 7.0–7.5 ms whole and 3.7–3.9 in 1 MiB blocks (4.8–5.2 at 512 KiB, 3.9–4.9 at
# 2 MiB); scratch measurements, 2 threads.
CACHE_BLOCK_BYTES = 1 << 20


def rows_per_cache_block(row_bytes: int) -> int:
    """Rows of `row_bytes` each in one `CACHE_BLOCK_BYTES` block (at least one)."""
    return max(1, CACHE_BLOCK_BYTES // row_bytes)


# The spectral SwiGLU MLP runs in FFN slices (`sct_edge/model/swiglu.py`) once a tokens x ffn activation
# reaches this size: glibc's largest mmap threshold, above which every such tensor is a fresh mapping that the
# kernel zeroes and faults in. Below it the plain composition is faster (the slices recompute in backward):
# SmolLM2 r128 at 4 x 256 (6 MB tensors, activations kept) took 4.56 and 4.83 s a step sliced against 4.20 and
# 4.04 s plain.
SLICE_FROM_BYTES = 32 << 20
# FFN columns a slice: 512 columns of 2,048 float32 tokens are 4 MiB a slice tensor. With torch's products on the
# llama3-8b r128 MLP shapes at 4 x 512 (one run each, quiet machine), forward and backward took 0.75 s in slices
# of 256, 0.79 s in slices of 512 and 0.98 s in slices of 1,024, against 0.90 s unsliced. With the products on
# oneDNN (`sct_edge/model/products.py`), 512 won: steps of 8 llama3-8b r128 blocks at 4 x 512 (1 graph kept, 7
# memos), alternating the width step by step in one process, 7.10 s (median of 5) against 7.42 s, and 7.2
# against 7.6 s in a second process.
MLP_SLICE_COLUMNS = 512
# Block memos (`sct_edge/model/memo.py`) start each tensor on a cache line of their arena.
MEMO_ALIGN_BYTES = 64


def mlp_in_slices(tokens: int, ffn: int, element_bytes: int) -> bool:
    """Whether a spectral MLP over `tokens` tokens with `ffn` hidden units runs in slices (`SLICE_FROM_BYTES`)."""
    return tokens * ffn * element_bytes >= SLICE_FROM_BYTES


def matrix_params(n_in: int, n_out: int, rank: int | None) -> int:
    """Stored parameters of one matrix: U, s and V when spectral, the full matrix when dense."""
    return n_in * n_out if rank is None else rank * (n_in + n_out + 1)


@dataclass
class ComponentCount:
    dense: int = 0  # as if every matrix were dense
    stored: int = 0  # as configured

    def add(self, dense: int, stored: int) -> None:
        self.dense += dense
        self.stored += stored


@dataclass
class ModelCount:
    """Per-component parameter counts of a whole model."""

    attn: ComponentCount = field(default_factory=ComponentCount)
    mlp: ComponentCount = field(default_factory=ComponentCount)
    block_norms: ComponentCount = field(default_factory=ComponentCount)
    embed: ComponentCount = field(default_factory=ComponentCount)
    head: ComponentCount = field(default_factory=ComponentCount)
    final_norm: ComponentCount = field(default_factory=ComponentCount)
    block_stored: list[int] = field(default_factory=list)  # stored parameters of each block

    @property
    def dense_total(self) -> int:
        """Dense parameters of the whole model (what `llama3-70b` means by 70.55B)."""
        return sum(c.dense for c in self.components().values())

    @property
    def stored_total(self) -> int:
        return sum(c.stored for c in self.components().values())

    @property
    def published_dense_equivalent(self) -> int:
        """The published dense-equivalent count: block weight matrices only (no norms, embeddings or head)."""
        return self.attn.dense + self.mlp.dense

    @property
    def published_spectral(self) -> int:
        """The published spectral count: block factors plus the two RMSNorm vectors of each block."""
        return self.attn.stored + self.mlp.stored + self.block_norms.stored

    def components(self) -> dict[str, ComponentCount]:
        return {
            "attn": self.attn, "mlp": self.mlp, "block_norms": self.block_norms,
            "embed": self.embed, "head": self.head, "final_norm": self.final_norm,
        }


def block_matrices(config: ModelConfig, layer: int) -> list[tuple[str, int, int, int | None]]:
    """(path, in, out, rank) of every weight matrix of block `layer`."""
    return [
        (f"layers.{layer}.{p}", n_in, n_out, config.ranks.rank_of(f"layers.{layer}.{p}"))
        for p, (n_in, n_out) in config.matrix_shapes().items()
    ]


def block_params(config: ModelConfig, layer: int) -> int:
    """Stored parameters of one block: its matrices as configured plus its two RMSNorm vectors."""
    return sum(matrix_params(i, o, r) for _, i, o, r in block_matrices(config, layer)) + 2 * config.dim


def count_params(config: ModelConfig) -> ModelCount:
    count = ModelCount()
    for layer in range(config.n_layers):
        for path, n_in, n_out, rank in block_matrices(config, layer):
            component = count.attn if ".attn." in path else count.mlp
            component.add(n_in * n_out, matrix_params(n_in, n_out, rank))
        count.block_norms.add(2 * config.dim, 2 * config.dim)
        count.block_stored.append(block_params(config, layer))
    v, d = config.vocab_size, config.dim
    count.embed.add(v * d, matrix_params(v, d, config.ranks.rank_of("embed")))
    if not config.tie_embeddings:
        count.head.add(v * d, matrix_params(d, v, config.ranks.rank_of("head")))
    count.final_norm.add(d, d)
    return count


def train_bytes(params: int) -> int:
    """Training memory of `params` parameters in the seeds' accounting (16 bytes each)."""
    return params * TRAIN_BYTES_PER_PARAM


@dataclass
class LayerRow:
    model: str
    n_in: int
    n_out: int
    rank: int
    dense_train_bytes: int
    sct_train_bytes: int

    @property
    def compression(self) -> float:
        return self.dense_train_bytes / self.sct_train_bytes


# The per-MLP-layer shapes the seeds publish (in × out).
PUBLISHED_MLP_LAYERS = [
    ("SmolLM2-135M", 576, 1536),
    ("SmolLM2-1.7B", 2048, 8192),
    ("LLaMA-7B", 4096, 11008),
    ("Qwen-27B", 4096, 17408),
    ("LLaMA-70B", 8192, 28672),
]


def mlp_layer_table(rank: int = 32) -> list[LayerRow]:
    """Training memory of one MLP matrix, dense vs spectral, for the published shapes."""
    return [
        LayerRow(name, n_in, n_out, rank, train_bytes(n_in * n_out), train_bytes(matrix_params(n_in, n_out, rank)))
        for name, n_in, n_out in PUBLISHED_MLP_LAYERS
    ]


def published_numbers(path: Path | None = None) -> dict:
    """The method's published figures (`published_numbers.json`, a copy of the mission's reference file), or
    those of the file at `path`."""
    path = path or Path(__file__).resolve().parent / "published_numbers.json"
    return json.loads(path.read_text())


def format_bytes(n: float) -> str:
    """`n` bytes for people, in binary units: "512 B", "212 MiB", "10.0 GiB" (three significant digits)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    value, unit = float(n), units[0]
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            break
        value /= 1024
    if unit == "B":
        return f"{int(n)} B"
    decimals = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{decimals}f} {unit}"
