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
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from sct_edge.convert.distillation import DistillConfig
from sct_edge.convert.output_aware import (
    CovarianceRoot,
    OutputSpectrum,
    gram_spectrum,
    output_aware_factors,
    output_spectrum,
    weight_norm2,
)
from sct_edge.convert.recovery import RecoveryConfig
from sct_edge.convert.source_model import SourceModel
from sct_edge.convert.tokenizer import Tokenizer
from sct_edge.engine.profile import Profile
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
CHUNK_BYTES = 64 * 2**20  # and at most this much float32 in one ffn-wide activation (1,170 tokens at ffn 14336)


# ------------------------------------------------------------------------------------- calibration text


@dataclass
class CalibrationConfig:
    """What `sct-edge import --calibrate` was asked for."""

    paths: list[Path]
    tokens: int = 16384
    seq_len: int = 512  # capped at the model's context
    sequential: bool = True  # statistics from the converted stream (False: from the dense model, one-shot)
    recovery: RecoveryConfig | None = field(default_factory=RecoveryConfig)  # None: no block-wise recovery
    budget: int | None = None  # bytes of RAM the import may use (`memory_plan`); None: no budget, streams in RAM
    spill: bool | None = None  # activation streams on disk (True), in RAM (False), or as the budget says (None)
    distill: DistillConfig | None = None  # whole-model distillation after the conversion; None: none
    profile: Profile | None = None  # the training engine's profile while distilling (its budget pages the blocks)


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
    """`n_tokens // seq_len` sequences of `seq_len` tokens drawn from every file: the files share the sequences
    equally (one too short for its share gives the rest to the others), and each file's sequences are spread
    evenly over its text, so a long or sorted text is sampled throughout rather than only at its head. A
    `.jsonl` file is read as `run` reads training data (text, prompt/completion or chat messages, the latter
    rendered with `chat_template`) and its examples' texts are joined by blank lines. A missing, unreadable,
    empty or non-UTF-8 file, or too little text for `n_tokens`, is a SctError naming it."""
    if seq_len < 2:
        raise SctError(f"the calibration sequence length must be at least 2, not {seq_len}")
    if n_tokens < seq_len:
        raise SctError(f"--calib-tokens must be at least one sequence ({seq_len} tokens), not {n_tokens}")
    streams, files = [], []
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
        streams.append(tokenizer.encode(text))
        files.append({"path": str(path.resolve()), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    n_seq = n_tokens // seq_len
    capacities = [len(ids) // seq_len for ids in streams]
    if sum(capacities) < n_seq:
        names = ", ".join(str(p) for p in paths)
        held = sum(len(ids) for ids in streams)
        raise SctError(
            f"{names}: {held:,} tokens of calibration text, room for {sum(capacities)} whole sequences of "
            f"{seq_len}, fewer than the {n_seq} that --calib-tokens {n_tokens:,} asks for (give more text or a "
            f"smaller --calib-tokens)"
        )
    sequences = []
    for ids, count in zip(streams, equal_shares(n_seq, capacities), strict=True):
        sequences += [ids[start : start + seq_len] for start in spread_starts(len(ids), seq_len, count)]
    return CalibrationText(torch.tensor(sequences, dtype=torch.int64).view(n_seq, seq_len), files)


def equal_shares(total: int, capacities: list[int]) -> list[int]:
    """`total` split as equally as `capacities` allow: whatever a full one cannot take goes to the others, and
    remainders to the first. Requires `sum(capacities) >= total`."""
    shares = [0] * len(capacities)
    open_ = [i for i, room in enumerate(capacities) if room > 0]
    left = total
    while left:
        each, extra = divmod(left, len(open_))
        for rank, i in enumerate(open_):
            take = min(each + (rank < extra), capacities[i] - shares[i])
            shares[i] += take
            left -= take
        open_ = [i for i in open_ if shares[i] < capacities[i]]
    return shares


def spread_starts(length: int, seq_len: int, count: int) -> list[int]:
    """`count` non-overlapping window starts spread evenly over `length` tokens, the first at 0 and the last
    ending at the end. Requires `count * seq_len <= length`."""
    if count <= 1:
        return [0] * count
    return [j * (length - seq_len) // (count - 1) for j in range(count)]


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


def chunk_tokens(width: int) -> int:
    """Tokens of one forward chunk for activations `width` wide (the widest a block makes: its ffn): at most
    CHUNK_TOKENS, and at most CHUNK_BYTES of float32 for one such activation."""
    return max(1, min(CHUNK_TOKENS, CHUNK_BYTES // (4 * width)))


def chunks(x: Tensor, width: int = 0) -> list[slice]:
    """Slices of whole sequences over the first axis of x: about `chunk_tokens(width)` tokens each."""
    step = max(1, chunk_tokens(max(width, x.shape[-1])) // x.shape[1])
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


class Activations:
    """Where the activation streams (sequences x seq_len x width, float32) live: in RAM, or, with a `directory`,
    in files there, memory-mapped (spilled: the kernel pages them in and out, so they take page cache, which
    it can reclaim, rather than RAM it cannot). A spilled stream's file is unlinked as soon as it is mapped:
    the mapping keeps the data until the tensor is freed, and nothing is left on disk afterwards, even when
    the process is killed."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.made = 0

    @property
    def spilled(self) -> bool:
        return self.directory is not None

    def empty(self, shape: tuple[int, ...]) -> Tensor:
        if self.directory is None:
            return torch.empty(shape)
        path = self.directory / f"activations-{self.made}.f32"
        self.made += 1
        n = math.prod(shape)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # the blocks are reserved first: a full disk is this one-line error, not a SIGBUS when a page is written
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, 4 * n)
            finally:
                os.close(fd)
            tensor = torch.from_file(str(path), shared=True, size=n, dtype=torch.float32)
        except OSError as error:
            raise SctError(f"{path}: cannot spill {4 * n / 2**20:.0f} MiB of activations there "
                           f"({error.strerror})") from None
        except RuntimeError as error:
            raise SctError(f"{path}: cannot spill activations there ({error})") from None
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        return tensor.view(shape)


@dataclass
class StageStatistics:
    """What one stage's matrices are factored from (`output_aware.output_spectrum` / `gram_spectrum`).

    Either the covariance of their shared input, C = Σ a aᵀ (in x in), or, for a stage whose input is wider
    than its outputs can justify (the MLP's down projection: C would be ffn x ffn, 1.6 GB in float64 for an
    8B model), each matrix's output Gram Σ (W a)(W a)ᵀ = W C Wᵀ (out x out), which is all its factors need.
    Both are sums of float32 chunk GEMMs kept in a float64 running total."""

    covariance: Tensor | None = None
    grams: dict[str, Tensor] = field(default_factory=dict)  # matrix name (e.g. "mlp.down") -> W C Wᵀ


def measured_on_outputs(shapes: list[tuple[int, int]]) -> bool:
    """Whether a stage whose dense matrices have these (out, in) shapes is measured by output Grams: every
    matrix has no more outputs than inputs, and the Grams together are smaller than C."""
    n_in = shapes[0][1]
    return all(o <= i for o, i in shapes) and sum(o * o for o, _ in shapes) < n_in * n_in


class _Accumulator:
    """The running statistics of one stage, fed a chunk of its input at a time."""

    def __init__(self, block: Block, stage: str) -> None:
        self.weights = {name: submodule(block, name).weight for name in dict(STAGES)[stage]}
        shapes = [tuple(w.shape) for w in self.weights.values()]
        self.on_outputs = measured_on_outputs(shapes)
        self.stats = StageStatistics()

    def add(self, a: Tensor) -> None:
        flat = a.flatten(0, 1)
        if not self.on_outputs:
            c = (flat.T @ flat).to(torch.float64)
            self.stats.covariance = c if self.stats.covariance is None else self.stats.covariance.add_(c)
            return
        for name, w in self.weights.items():
            y = flat @ w.T
            g = (y.T @ y).to(torch.float64)
            self.stats.grams[name] = self.stats.grams[name].add_(g) if name in self.stats.grams else g


def staged_forward(
    block: Block,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    at_stage: Callable[[str, StageStatistics], None],
    streams: Activations | None = None,
) -> Tensor:
    """The block's output on x (sequences x seq_len x dim), computed stage by stage over all of x: before each
    stage's matrices are applied, `at_stage(stage, statistics)` gets the statistics of their input and may
    replace them (the converted matrices are then the ones that produce the next stage's input). No grad.

    Held across chunks: x, the attention's pre-o output (until the residual is added) and the residual stream,
    each in `streams` (RAM or spilled). The norms' outputs and the ffn-wide MLP activation are recomputed per
    chunk instead of kept, so nothing ffn-wide outlives a chunk."""
    streams = streams or Activations()
    parts = chunks(x, block.attn.config.ffn_dim)
    with torch.no_grad():
        acc = _Accumulator(block, "attn_in")
        for p in parts:
            acc.add(block.attn_norm(x[p]))
        at_stage("attn_in", acc.stats)
        acc, z = _Accumulator(block, "o_in"), None
        with _identity(block, "attn.o"):
            for p in parts:
                zp = block.attn(block.attn_norm(x[p]), cos, sin)
                if z is None:
                    z = streams.empty((*x.shape[:2], zp.shape[-1]))
                z[p] = zp
                acc.add(zp)
                del zp
        at_stage("o_in", acc.stats)
        h = streams.empty(tuple(x.shape))
        for p in parts:
            h[p] = x[p] + block.attn.o(z[p])
        del z
        acc = _Accumulator(block, "mlp_in")
        for p in parts:
            acc.add(block.mlp_norm(h[p]))
        at_stage("mlp_in", acc.stats)
        acc = _Accumulator(block, "down_in")
        with _identity(block, "mlp.down"):
            for p in parts:
                acc.add(block.mlp(block.mlp_norm(h[p])))
        at_stage("down_in", acc.stats)
        for p in parts:  # the block's output, in place of the residual stream it adds to
            h[p] += block.mlp(block.mlp_norm(h[p]))
        return h


def run_block(block: Block, x: Tensor, cos: Tensor, sin: Tensor, streams: Activations | None = None) -> Tensor:
    out = (streams or Activations()).empty(tuple(x.shape))
    with torch.no_grad():
        for p in chunks(x, block.attn.config.ffn_dim):
            out[p] = block(x[p], cos, sin)
    return out


def relative_error(out: Tensor, target: Tensor, dense_input: Tensor) -> float:
    """‖out − target‖ / ‖target − dense_input‖: a block's output error as a fraction of what the dense block
    adds to its residual stream (against the residual stream itself every error would look tiny). By chunks."""
    num = den = 0.0
    for p in chunks(out):
        num += float(((out[p] - target[p]).to(torch.float64) ** 2).sum())
        den += float(((target[p] - dense_input[p]).to(torch.float64) ** 2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


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
Statistics = Callable[[int, str, StageStatistics], None]  # (layer, stage, what its factors came from)


def embedded(source: SourceModel, tokens: Tensor, streams: Activations | None = None) -> Tensor:
    """The embedding rows of the calibration tokens (sequences x seq_len x dim)."""
    table = source.tensor("embed.weight")
    out = (streams or Activations()).empty((*tokens.shape, table.shape[1]))
    for p in chunks(out):
        out[p] = table[tokens[p]]
    return out


def spectra(block: Block, stage: str, stats: StageStatistics, names: list[str], vectors: bool = True):
    """(name, dense weight, OutputSpectrum) of each of `names` (matrices of `stage`) from the stage's statistics."""
    cov = None if stats.covariance is None else CovarianceRoot(stats.covariance)
    for name in names:
        w = submodule(block, name).weight
        if name in stats.grams:
            yield name, w, gram_spectrum(stats.grams[name], weight_norm2(w), vectors)
        else:
            yield name, w, output_spectrum(w, cov, vectors)


def output_gains(
    source: SourceModel,
    tokens: Tensor,
    matrices: set[str],
    on_progress: Progress | None = None,
    streams: Activations | None = None,
) -> dict[str, Tensor]:
    """σ_j² / Σσ² of W S for every matrix path in `matrices`, from the dense model's statistics: what each
    rank of each matrix keeps of its outputs, for spreading ranks by size before any block is converted."""
    config = source.config
    cos, sin = rope_tables(config, torch.arange(tokens.shape[1]))
    x = embedded(source, tokens, streams)
    gains = {}
    n = config.n_layers
    for layer in range(n):
        block = dense_block(source, layer)

        def measure(stage: str, stats: StageStatistics, block: Block = block, layer: int = layer) -> None:
            names = [name for name in dict(STAGES)[stage] if f"layers.{layer}.{name}" in matrices]
            for name, _, spectrum in spectra(block, stage, stats, names, vectors=False):
                power = spectrum.sigma**2
                gains[f"layers.{layer}.{name}"] = power / power.sum().clamp_min(1e-300)

        x = staged_forward(block, x, cos, sin, measure, streams)
        del block
        if on_progress is not None:
            on_progress("measuring spectra", layer + 1, n)
    return gains


class BlockConverter:
    """Converts the matrices of one dense block, stage by stage, from the statistics `staged_forward` hands it."""

    def __init__(self, block: Block, layer: int, choose_rank: RankChooser, on_statistics: Statistics | None):
        self.block, self.layer = block, layer
        self.choose_rank, self.on_statistics = choose_rank, on_statistics
        self.results: list[MatrixResult] = []
        self.pending: list[MatrixResult] = []  # factored, not yet in the block

    def measure(self, stage: str, stats: StageStatistics) -> None:
        """Factor the matrices of `stage` from their input statistics (the block is left as it is)."""
        if self.on_statistics is not None:
            self.on_statistics(self.layer, stage, stats)
        for name, w, spectrum in spectra(self.block, stage, stats, list(dict(STAGES)[stage])):
            path = f"layers.{self.layer}.{name}"
            shape = (w.shape[0], w.shape[1])
            rank = self.choose_rank(path, spectrum, shape)
            if rank is not None:
                f = output_aware_factors(w, spectrum, rank)
                self.pending.append(MatrixResult(path, shape, f.U, f.s, f.V, f.output_energy, f.weight_energy))
            del spectrum

    def apply(self) -> None:
        """Put the factored matrices into the block in place of the dense ones."""
        for r in self.pending:
            replace(self.block, r.path.split(".", 2)[2], spectral_module(r.U, r.s, r.V))
        self.results += self.pending
        self.pending = []

    def convert_now(self, stage: str, stats: StageStatistics) -> None:
        self.measure(stage, stats)
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
    streams: Activations | None = None,
) -> Tensor:
    """Convert every block of `source` with output-aware factors measured on `tokens`, one block at a time, and
    return the dense model's final hidden states on `tokens` (before the final norm; the end of the dense
    stream, in `streams`): the teacher of whole-model distillation.

    `choose_rank(path, spectrum, (out, in))` gives each matrix's rank (None: keep it dense). `recover(block,
    inputs, targets, layer)`, when given, trains the converted block's factors towards the dense outputs and
    returns what it did. Each finished block goes to `on_block` (the caller stages its factors; nothing of it
    is kept here); `on_statistics(layer, stage, statistics)` sees every covariance and output Gram the factors
    were computed from. The activation streams live in `streams` (default: RAM).
    """
    streams = streams or Activations()
    config: ModelConfig = source.config
    cos, sin = rope_tables(config, torch.arange(tokens.shape[1]))
    x_dense = embedded(source, tokens, streams)
    x_conv = x_dense
    n = config.n_layers
    for layer in range(n):
        block = dense_block(source, layer)
        converter = BlockConverter(block, layer, choose_rank, on_statistics)
        if sequential:
            # The dense block's output is the target; the statistics come from the converted stream, each
            # stage's input computed through the matrices already converted.
            target = run_block(block, x_dense, cos, sin, streams)
            out = staged_forward(block, x_conv, cos, sin, converter.convert_now, streams)
        else:
            # Every statistic from the dense block on the dense stream, whose output is also the target.
            target = staged_forward(block, x_dense, cos, sin, converter.measure, streams)
            converter.apply()
            out = run_block(block, x_conv, cos, sin, streams)
        results = converter.results
        before = after = relative_error(out, target, x_dense)
        recovery: dict = {}
        if recover is not None and results:
            recovery = recover(block, x_conv, target, layer)
            del out
            out = run_block(block, x_conv, cos, sin, streams)
            after = relative_error(out, target, x_dense)
            for r in results:
                module = submodule(block, r.path.split(".", 2)[2])
                r.U, r.s, r.V = module.U.detach(), module.s.detach(), module.V.detach()
        x_conv, x_dense = out, target
        del out, target
        if on_block is not None:
            on_block(BlockResult(layer, results, before, after, recovery))
        del block, results, converter
        if on_progress is not None:
            on_progress("converting" if recover is None else "converting and recovering", layer + 1, n)
    return x_dense


# ------------------------------------------------------------------------------------------ memory budget

BASE_BYTES = 512 * 2**20  # the interpreter, torch, the tokenizer, the source's tensor index, allocator slack
STREAMS_HELD = 5  # activation streams alive at once: dense and converted input, target, pre-o output, output


@dataclass
class MemoryPlan:
    """What a calibrated import holds in RAM, by the estimate `memory_plan` makes, and whether it spills."""

    block: int  # one dense block in float32
    factoring: int  # the float64 statistics and eigenproblems of the widest stage
    chunk: int  # one chunk's activations (the ffn-wide ones, and recovery's autograd)
    dense_tensor: int  # the largest tensor read whole (the embedding, or the head), float32
    streams: int  # the activation streams, when held in RAM
    spill: bool

    @property
    def fixed(self) -> int:
        """What no spilling can move to disk."""
        return BASE_BYTES + max(self.block + self.factoring + self.chunk, self.dense_tensor)

    @property
    def resident(self) -> int:
        return self.fixed + (0 if self.spill else self.streams)


def memory_plan(config: ModelConfig, n_tokens: int, seq_len: int, budget: int | None) -> MemoryPlan:
    """The memory a calibrated import of `config` on `n_tokens` tokens needs, and whether its activation
    streams must be spilled to disk to stay within `budget` bytes (None: no budget, held in RAM).

    The estimate: one dense float32 block; six float64 n x n matrices (n the widest statistic: C or an output
    Gram, with its root, the eigenproblem, its vectors and LAPACK's workspace); one chunk of activations,
    ten ffn-wide float32 rows a token (the MLP's forward, and recovery's autograd on a chunk); the embedding,
    read whole once; and STREAMS_HELD streams of tokens x dim float32. SctError when the part that cannot be
    spilled is over the budget."""
    shapes = config.matrix_shapes()
    block = 4 * (sum(i * o for i, o in shapes.values()) + 2 * config.dim)
    widest = config.dim
    for _, names in STAGES:
        dims = [shapes[name] for name in names]  # (in, out)
        outs = [(o, i) for i, o in dims]
        widest = max(widest, *(o for o, _ in outs)) if measured_on_outputs(outs) else max(widest, dims[0][0])
    factoring = 6 * 8 * widest * widest
    width = max(config.ffn_dim, config.dim)
    tokens_a_chunk = max(seq_len, chunk_tokens(width) // seq_len * seq_len)
    chunk = 10 * 4 * tokens_a_chunk * width
    dense_tensor = 4 * config.vocab_size * config.dim
    streams = STREAMS_HELD * 4 * n_tokens * max(config.dim, config.n_heads * config.head_dim)
    plan = MemoryPlan(block, factoring, chunk, dense_tensor, streams, spill=False)
    if budget is not None:
        if plan.fixed > budget:
            raise SctError(
                f"a memory budget of {_gib(budget)} is too small for a calibrated import of {config.name}: one block "
                f"needs about {_gib(plan.fixed)} even with its activations on disk ({_gib(block)} of dense float32 "
                f"weights, {_gib(factoring)} to factor them, {_gib(chunk)} of activations a chunk, "
                f"{_gib(dense_tensor)} for the embedding read whole, {_gib(BASE_BYTES)} for the process)"
            )
        plan.spill = plan.fixed + streams > budget
    return plan


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
