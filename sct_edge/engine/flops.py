"""Model FLOPs of a training step, and the machine's GEMM peak to hold them against (MFU).

Model FLOPs count the work the model needs, not what an engine happens to do: a recompute in backward
or a padded attention tile is not counted, so two engines of the same model are compared on one scale.

Forward, per token: 2·k·(in + out) for a spectral matrix at rank k (the three products x U, · s, · Vᵀ; the
k-wide scaling is negligible), 2·in·out for a dense one; causal attention's Q Kᵀ and A V at 2·2·d_head per
head and per visible key, a token at position t (0-based) seeing t + 1 keys; the LM head like any matrix;
the embedding lookup is free when dense and costs the V projection (2·k·dim) when spectral. Training is
forward × 3 (backward computes two products per forward product: the input's gradient and the weights').
The hidden-sum workload has no embedding, head or softmax attention, only the seven matrices of each block.

MFU is model FLOPs per second over the GEMM peak of square products measured on this machine in the step's
compute dtype (float32, or bfloat16 where a profile computes in it), with the thread count the run uses, in
the same invocation (`gemm_peak`), with the library the step's products use (`step_library`: oneDNN where
`sct_edge/model/products.py` routes them there, torch's GEMM otherwise): the speed those products can reach.
torch's own float32 GEMM is MKL's, which runs AVX2 code on AMD CPUs with AVX-512; `tools/gemm_peaks` shows
torch's, oneDNN's and OpenBLAS's peaks side by side.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from sct_edge.model.config import ModelConfig
from sct_edge.model.products import uses_onednn

PEAK_SIZES = (1024, 2048, 4096)


def matrix_flops(n_in: int, n_out: int, rank: int | None) -> int:
    """Forward FLOPs per token of one linear map: dense when `rank` is None, else spectral at that rank."""
    return 2 * n_in * n_out if rank is None else 2 * rank * (n_in + n_out)


def attention_flops(config: ModelConfig, seq: int) -> int:
    """Forward FLOPs of causal attention scores and mixing for one sequence of `seq` tokens, one block."""
    if config.attention == "additive":
        return 0
    visible_keys = seq * (seq + 1) // 2
    return 2 * 2 * config.n_heads * config.head_dim * visible_keys


def forward_flops_per_sequence(config: ModelConfig, seq: int, workload: str = "lm") -> int:
    """Forward model FLOPs of one sequence of `seq` tokens (blocks only for the hidden-sum workload)."""
    total = 0
    for layer in range(config.n_layers):
        for path, (n_in, n_out) in config.matrix_shapes().items():
            total += seq * matrix_flops(n_in, n_out, config.ranks.rank_of(f"layers.{layer}.{path}"))
        total += attention_flops(config, seq)
    if workload == "lm":
        embed_rank = config.ranks.rank_of("embed")
        total += 0 if embed_rank is None else seq * 2 * embed_rank * config.dim
        head_rank = embed_rank if config.tie_embeddings else config.ranks.rank_of("head")
        total += seq * matrix_flops(config.dim, config.vocab_size, head_rank)
    return total


def training_step_flops(config: ModelConfig, batch: int, seq: int, micro_batches: int = 1, workload: str = "lm") -> int:
    """Model FLOPs of one training step over `micro_batches` micro-batches of `batch` × `seq`: forward × 3."""
    return 3 * micro_batches * batch * forward_flops_per_sequence(config, seq, workload)


@dataclass
class GemmPeak:
    """The best square-GEMM rate measured in one dtype, with the size that reached it and the threads used."""

    flops_per_s: float
    size: int
    threads: int
    per_size: dict[int, float]
    dtype: str = "float32"
    library: str = "torch"

    def to_json(self) -> dict:
        return {"gemm_peak_flops": self.flops_per_s, "gemm_peak_size": self.size, "gemm_threads": self.threads,
                "gemm_per_size": {str(k): v for k, v in self.per_size.items()}, "gemm_peak_dtype": self.dtype,
                "gemm_peak_library": self.library}


LIBRARIES = ("torch", "onednn", "openblas")


def step_library(dtype: str = "float32") -> str:
    """The library of the step's products in `dtype`: oneDNN where `sct_edge/model/products.py` routes float32
    products to it, torch's own otherwise (whose bfloat16 products are oneDNN's already)."""
    return "onednn" if dtype == "float32" and uses_onednn() else "torch"


def gemm_peak(threads: int | None = None, sizes: tuple[int, ...] = PEAK_SIZES, repeats: int = 3,
              dtype: str = "float32", library: str | None = None) -> GemmPeak:
    """GEMM FLOP/s of square products in `dtype` (float32 or bfloat16): the median of `repeats` timed products
    per size, best size wins.

    `threads` sets torch's thread count for the measurement (restored after); it should be the run's.
    `library` None times the products the step runs (`step_library`), so MFU is against what its products can
    reach; "torch" times `torch.mm` (MKL for float32), "onednn" torch's oneDNN (`_linear_pointwise`, float32,
    its result allocated as the step's are), "openblas" OpenBLAS's GEMM (float32, `sct_edge.model.openblas`,
    on `threads` of its own threads): what the CPU reaches where torch's MKL does not use all of it (AVX-512 on
    AMD CPUs).
    """
    library = step_library(dtype) if library is None else library
    if library not in LIBRARIES:
        raise ValueError(f"gemm_peak: library is one of {', '.join(LIBRARIES)}, not {library!r}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    if library == "openblas":
        from sct_edge.model import openblas

        def multiply(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
            openblas.gemm(a, b, out, torch.get_num_threads())
    elif library == "onednn":
        def multiply(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
            torch.ops.mkldnn._linear_pointwise(a, b.T, None, "none", [], "")  # a b; oneDNN has no out=
    else:
        def multiply(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
            torch.mm(a, b, out=out)
    try:
        per_size = {}
        for n in sizes:
            gen = torch.Generator().manual_seed(n)
            a, b = (torch.randn(n, n, generator=gen).to(getattr(torch, dtype)) for _ in range(2))
            out = torch.empty_like(a)
            multiply(a, b, out)  # warm-up: first touch of the pages and the library's setup
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                multiply(a, b, out)
                times.append(time.perf_counter() - t0)
            per_size[n] = 2 * n**3 / statistics.median(times)
        best = max(per_size, key=per_size.get)
        return GemmPeak(per_size[best], best, torch.get_num_threads(), per_size, dtype, library)
    finally:
        torch.set_num_threads(previous)


def mfu(step_flops: int, step_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return step_flops / step_s / peak_flops_per_s
