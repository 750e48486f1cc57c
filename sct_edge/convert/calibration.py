"""Calibrated conversion, streamed one dense block at a time: the calibration tokens, the input covariances of
every matrix, output-aware factors (`sct_edge.convert.output_aware`) and block-wise recovery
(`sct_edge.convert.recovery`).

Two activation streams go through the model, block by block, as (sequences x seq_len x dim) chunks:
- the dense stream, the original model's hidden states: each block's targets (its dense outputs) come from it;
- the converted stream, the hidden states the already-converted blocks 0..i-1 produce (sequential statistics):
  block i's covariances are measured on it, so each block is fitted to the errors upstream of it.
Inside a block the same holds matrix by matrix: q, k and v (one shared input, so one covariance) are converted
first, then o's input is measured through the converted q, k, v; gate and up (shared input) through the
converted attention; down through the converted gate and up. With `sequential=False` every covariance comes
from the dense stream instead (the one-shot method of SVD-LLM). Only one dense block, its covariances and the
two streams are in RAM at a time, never the whole model.

Ranks by size need every matrix's output spectrum before the first block is converted, so `--params-ratio` and
`--size` take a first pass over the dense stream that keeps only the spectra's singular values
(`output_gains`); the conversion pass then follows.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from sct_edge.convert.output_aware import CovarianceRoot, OutputSpectrum, output_aware_factors, output_spectrum
from sct_edge.convert.recovery import RecoveryConfig
from sct_edge.convert.source_model import SourceModel
from sct_edge.convert.tokenizer import Tokenizer
from sct_edge.errors import SctError
from sct_edge.model.config import ModelConfig
from sct_edge.model.spectral import SpectralLinear
from sct_edge.model.transformer import Block, dense_config, rope_tables
from sct_edge.train.examples import example_texts

# The matrices of a block grouped by the input they read, in the order the converted stream reaches them.
STAGES = (
    ("attn_in", ("attn.q", "attn.k", "attn.v")),
    ("o_in", ("attn.o",)),
    ("mlp_in", ("mlp.gate", "mlp.up")),
    ("down_in", ("mlp.down",)),
)
CHUNK_TOKENS = 2048  # tokens of one forward chunk: bounds the activations a stage holds at once


# ------------------------------------------------------------------------------------- calibration text


@dataclass
class CalibrationConfig:
    """What `sct-edge import --calibrate` was asked for."""

    paths: list[Path]
    tokens: int = 16384
    seq_len: int = 512  # capped at the model's context
    sequential: bool = True  # statistics from the converted stream (False: from the dense model, one-shot)
    recovery: RecoveryConfig | None = field(default_factory=RecoveryConfig)  # None: no block-wise recovery


@dataclass
class CalibrationText:
    """Calibration tokens cut into sequences, and where they came from."""

    tokens: Tensor  # n_sequences x seq_len, int64
    files: list[dict]  # path, bytes, sha256 of each source

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


def calibration_text(
    paths: list[Path], tokenizer: Tokenizer, n_tokens: int, seq_len: int, chat_template: str | None = None
) -> CalibrationText:
    """The first `n_tokens` tokens of the files' texts (joined by blank lines), as `n_tokens // seq_len`
    sequences. A `.jsonl` file is read as `run` reads training data (text, prompt/completion or chat messages,
    the latter rendered with `chat_template`) and each example's text is taken whole. A missing, unreadable,
    empty or non-UTF-8 file, or too little text for `n_tokens`, is a SctError naming it."""
    if seq_len < 2:
        raise SctError(f"the calibration sequence length must be at least 2, not {seq_len}")
    if n_tokens < seq_len:
        raise SctError(f"--calib-tokens must be at least one sequence ({seq_len} tokens), not {n_tokens}")
    texts, files = [], []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SctError(f"{path}: no such calibration text file")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise SctError(f"{path}: cannot read the calibration text ({error.strerror})") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            where = f"{error.reason} at byte {error.start}"
            raise SctError(f"{path}: the calibration text is not UTF-8 ({where})") from None
        if path.suffix.lower() == ".jsonl" and text.strip():
            text = "\n\n".join(example_texts(path, tokenizer, chat_template))
        if not text.strip():
            raise SctError(f"{path}: the calibration text is empty")
        texts.append(text)
        files.append({"path": str(path.resolve()), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    ids = tokenizer.encode("\n\n".join(texts))
    if len(ids) < n_tokens:
        names = ", ".join(str(p) for p in paths)
        raise SctError(
            f"{names}: {len(ids):,} tokens of calibration text, fewer than the {n_tokens:,} asked for "
            f"(give more text or a smaller --calib-tokens)"
        )
    n_seq = n_tokens // seq_len
    tokens = torch.tensor(ids[: n_seq * seq_len], dtype=torch.int64).view(n_seq, seq_len)
    return CalibrationText(tokens, files)


# ----------------------------------------------------------------------------------- one block's pieces


def dense_block(source: SourceModel, layer: int) -> Block:
    """Block `layer` of `source` with its dense weights, read now (float32)."""
    config = dense_config(source.config)
    block = Block(config, layer, device="meta")
    prefix = f"layers.{layer}."
    state = {name: source.tensor(prefix + name) for name in block.state_dict()}
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise SctError(f"{source.path}: tensor {prefix + name} has non-finite values (NaN or infinity)")
    block.load_state_dict(state, assign=True)
    return block.requires_grad_(False).eval()


def spectral_module(U: Tensor, s: Tensor, V: Tensor) -> SpectralLinear:
    """A SpectralLinear holding the given factors (no random init)."""
    layer = SpectralLinear(U.shape[0], V.shape[0], U.shape[1], device="meta")
    layer.U, layer.s, layer.V = nn.Parameter(U), nn.Parameter(s), nn.Parameter(V)
    return layer


def submodule(block: Block, path: str) -> nn.Module:
    part, name = path.split(".")
    return getattr(getattr(block, part), name)


def replace(block: Block, path: str, module: nn.Module) -> None:
    part, name = path.split(".")
    setattr(getattr(block, part), name, module)


@contextlib.contextmanager
def _identity(block: Block, path: str) -> Iterator[None]:
    """Block with matrix `path` replaced by the identity for a while: its forward then returns that matrix's input."""
    kept = submodule(block, path)
    replace(block, path, nn.Identity())
    try:
        yield
    finally:
        replace(block, path, kept)


def chunks(x: Tensor) -> list[slice]:
    """Slices of whole sequences, about CHUNK_TOKENS tokens each, over the first axis of x."""
    step = max(1, CHUNK_TOKENS // x.shape[1])
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def _covariance(parts: list[Tensor]) -> Tensor:
    """C = Σ over tokens of a aᵀ: each chunk's sum in float32 (a GEMM), the running total in float64."""
    total = None
    for a in parts:
        flat = a.flatten(0, 1)
        c = (flat.T @ flat).to(torch.float64)
        total = c if total is None else total + c
    return total


def staged_forward(
    block: Block, x: Tensor, cos: Tensor, sin: Tensor, at_stage: Callable[[str, Tensor], None]
) -> Tensor:
    """The block's output on x (sequences x seq_len x dim), computed stage by stage over all of x: before each
    stage's matrices are applied, `at_stage(stage, C)` gets the covariance of their input and may replace
    them (the converted matrices are then the ones that produce the next stage's input). No grad."""
    with torch.no_grad():
        parts = [x[p] for p in chunks(x)]
        a = [block.attn_norm(xp) for xp in parts]
        at_stage("attn_in", _covariance(a))
        with _identity(block, "attn.o"):
            z = [block.attn(ap, cos, sin) for ap in a]
        del a
        at_stage("o_in", _covariance(z))
        h = [xp + block.attn.o(zp) for xp, zp in zip(parts, z, strict=True)]
        del z
        m = [block.mlp_norm(hp) for hp in h]
        at_stage("mlp_in", _covariance(m))
        with _identity(block, "mlp.down"):
            g = [block.mlp(mp) for mp in m]
        del m
        at_stage("down_in", _covariance(g))
        return torch.cat([hp + block.mlp.down(gp) for hp, gp in zip(h, g, strict=True)])


def run_block(block: Block, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([block(x[p], cos, sin) for p in chunks(x)])


def relative_error(out: Tensor, target: Tensor, dense_input: Tensor) -> float:
    """‖out − target‖ / ‖target − dense_input‖: a block's output error as a fraction of what the dense block
    adds to its residual stream (against the residual stream itself every error would look tiny)."""
    return float((out - target).norm() / (target - dense_input).norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------- the whole model


@dataclass
class MatrixResult:
    """One converted matrix: its factors (after recovery, if any) and what the conversion kept."""

    path: str
    shape: tuple[int, int]  # (out, in)
    U: Tensor
    s: Tensor
    V: Tensor
    output_energy: float
    weight_energy: float

    @property
    def rank(self) -> int:
        return int(self.s.numel())


@dataclass
class BlockResult:
    layer: int
    matrices: list[MatrixResult]
    error_before: float  # block_error after conversion, before recovery
    error_after: float  # after recovery (the same when there was none)
    recovery: dict = field(default_factory=dict)


RankChooser = Callable[[str, OutputSpectrum, tuple[int, int]], int | None]  # None keeps the matrix dense
Progress = Callable[[str, int, int], None]  # (phase, blocks done, blocks in all)
Statistics = Callable[[int, str, Tensor], None]  # (layer, stage, covariance)


def embedded(source: SourceModel, tokens: Tensor) -> Tensor:
    """The embedding rows of the calibration tokens (sequences x seq_len x dim)."""
    return source.tensor("embed.weight")[tokens]


def output_gains(
    source: SourceModel,
    tokens: Tensor,
    matrices: set[str],
    on_progress: Progress | None = None,
) -> dict[str, Tensor]:
    """σ_j² / Σσ² of W S for every matrix path in `matrices`, from the dense model's statistics: what each
    rank of each matrix keeps of its outputs, for spreading ranks by size before any block is converted."""
    config = source.config
    cos, sin = rope_tables(config, torch.arange(tokens.shape[1]))
    x = embedded(source, tokens)
    gains = {}
    n = config.n_layers
    for layer in range(n):
        block = dense_block(source, layer)

        def measure(stage: str, c: Tensor, block: Block = block, layer: int = layer) -> None:
            cov = CovarianceRoot(c)
            for name in dict(STAGES)[stage]:
                path = f"layers.{layer}.{name}"
                if path in matrices:
                    power = output_spectrum(submodule(block, name).weight, cov, vectors=False).sigma ** 2
                    gains[path] = power / power.sum().clamp_min(1e-300)

        x = staged_forward(block, x, cos, sin, measure)
        del block
        if on_progress is not None:
            on_progress("measuring spectra", layer + 1, n)
    return gains


class BlockConverter:
    """Converts the matrices of one dense block, stage by stage, from the covariances `staged_forward` hands it."""

    def __init__(self, block: Block, layer: int, choose_rank: RankChooser, on_statistics: Statistics | None):
        self.block, self.layer = block, layer
        self.choose_rank, self.on_statistics = choose_rank, on_statistics
        self.results: list[MatrixResult] = []
        self.pending: list[MatrixResult] = []  # factored, not yet in the block

    def measure(self, stage: str, c: Tensor) -> None:
        """Factor the matrices of `stage` from their input covariance C (the block is left as it is)."""
        if self.on_statistics is not None:
            self.on_statistics(self.layer, stage, c)
        cov = CovarianceRoot(c)
        for name in dict(STAGES)[stage]:
            path = f"layers.{self.layer}.{name}"
            w = submodule(self.block, name).weight
            shape = (w.shape[0], w.shape[1])
            spectrum = output_spectrum(w, cov)
            rank = self.choose_rank(path, spectrum, shape)
            if rank is not None:
                f = output_aware_factors(w, spectrum, rank)
                self.pending.append(MatrixResult(path, shape, f.U, f.s, f.V, f.output_energy, f.weight_energy))

    def apply(self) -> None:
        """Put the factored matrices into the block in place of the dense ones."""
        for r in self.pending:
            replace(self.block, r.path.split(".", 2)[2], spectral_module(r.U, r.s, r.V))
        self.results += self.pending
        self.pending = []

    def convert_now(self, stage: str, c: Tensor) -> None:
        self.measure(stage, c)
        self.apply()


def convert_blocks(
    source: SourceModel,
    tokens: Tensor,
    choose_rank: RankChooser,
    *,
    sequential: bool = True,
    recover: Callable[[Block, Tensor, Tensor, int], dict] | None = None,
    on_block: Callable[[BlockResult], None] | None = None,
    on_progress: Progress | None = None,
    on_statistics: Statistics | None = None,
) -> None:
    """Convert every block of `source` with output-aware factors measured on `tokens`, one block at a time.

    `choose_rank(path, spectrum, (out, in))` gives each matrix's rank (None: keep it dense). `recover(block,
    inputs, targets, layer)`, when given, trains the converted block's factors towards the dense outputs and
    returns what it did. Each finished block goes to `on_block` (the caller stages its factors; nothing of it
    is kept here); `on_statistics(layer, stage, C)` sees every covariance the factors were computed from.
    """
    config: ModelConfig = source.config
    cos, sin = rope_tables(config, torch.arange(tokens.shape[1]))
    x_dense = embedded(source, tokens)
    x_conv = x_dense
    n = config.n_layers
    for layer in range(n):
        block = dense_block(source, layer)
        converter = BlockConverter(block, layer, choose_rank, on_statistics)
        if sequential:
            # The dense block's output is the target; the statistics come from the converted stream, each
            # stage's input computed through the matrices already converted.
            target = run_block(block, x_dense, cos, sin)
            out = staged_forward(block, x_conv, cos, sin, converter.convert_now)
        else:
            # Every covariance from the dense block on the dense stream, whose output is also the target.
            target = staged_forward(block, x_dense, cos, sin, converter.measure)
            converter.apply()
            out = run_block(block, x_conv, cos, sin)
        results = converter.results
        before = after = relative_error(out, target, x_dense)
        recovery: dict = {}
        if recover is not None and results:
            recovery = recover(block, x_conv, target, layer)
            out = run_block(block, x_conv, cos, sin)
            after = relative_error(out, target, x_dense)
            for r in results:
                module = submodule(block, r.path.split(".", 2)[2])
                r.U, r.s, r.V = module.U.detach(), module.s.detach(), module.V.detach()
        x_conv, x_dense = out, target
        if on_block is not None:
            on_block(BlockResult(layer, results, before, after, recovery))
        del block, results
        if on_progress is not None:
            on_progress("converting" if recover is None else "converting and recovering", layer + 1, n)
