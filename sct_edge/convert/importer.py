"""Import a pretrained LLaMA-family checkpoint (a Hugging Face directory or a GGUF file) into a spectral store.

Every weight matrix W (out x in, nn.Linear layout) becomes factors U (in x k), s (k), V (out x k) by a truncated
SVD; norms, and the components kept dense, are copied. The import streams: one source tensor is read (and
dequantised), factored and written to a staging file at a time, so peak memory is about one dense matrix plus
its SVD workspace, never the model. The staging pass comes first because an energy target fixes each
matrix's rank only once its spectrum is known, and a store's layout (hence its config) must be known when
the store is created; the store is then written shard by shard from the staged factors by `Store.create`.

Which SVD (the thresholds are module constants):
- exact LAPACK SVD in float64 (`spectral.truncated_svd`) when the matrix's smaller side is at most
  `FULL_SVD_MAX_DIM`, and for fixed ranks that are not far below the matrix size;
- randomized SVD (`torch.svd_lowrank`, `OVERSAMPLE` extra columns, `POWER_ITERATIONS` power iterations) for
  fixed ranks k with k + OVERSAMPLE <= `RANDOMIZED_MAX_FRACTION` * min(out, in), and for energy targets on
  matrices larger than `FULL_SVD_MAX_DIM`: Σσ² over the whole spectrum is ‖W‖_F², so the kept fraction is
  known from the leading values alone, and k grows (doubling) until the target is met.

Reported per matrix (`extra["import_report"]` of the store, shown by `sct-edge inspect`): the rank, the kept
energy Σ kept s² / ‖W‖_F², and the relative error ‖W − U diag(s) Vᵀ‖_F / ‖W‖_F = sqrt(1 − kept energy). That
identity is exact for both SVDs: each keeps an orthogonal projection P W of W (the leading singular subspace,
or the subspace the randomized range finder found) whose singular values are exactly the kept s, and
‖W − P W‖² = ‖W‖² − ‖P W‖² by Pythagoras. So W_hat is never built.

With a calibration text (`sct-edge import --calibrate`), the attention and MLP matrices are converted block by
block instead: output-aware factors from the covariances of each matrix's inputs (`output_aware`, streamed by
`calibration`), then block-wise recovery (`recovery`); the report adds each matrix's output energy kept, and
`extra["import"]` the method, calibration files (sha256), token count, each block's output error before and after
recovery, and the times. `--params-ratio` and `--size` spread ranks across matrices by output error (weight
error without calibration) per stored number (`output_aware.allocate_ranks`). A fixed rank above a matrix's
full rank is capped there, with a note.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sct_edge.convert.calibration import (
    Activations,
    BlockResult,
    CalibrationConfig,
    calibration_text,
    chunk_tokens,
    convert_blocks,
    memory_plan,
    output_gains,
)
from sct_edge.convert.distillation import distill_plan, distill_store
from sct_edge.convert.output_aware import OutputSpectrum, RankCandidate, allocate_ranks
from sct_edge.convert.recovery import recover_block
from sct_edge.convert.source_model import SourceModel
from sct_edge.errors import SctError
from sct_edge.model.accounting import matrix_params
from sct_edge.model.config import ATTN_MATRICES, COMPONENTS, MLP_MATRICES, ModelConfig, RankPolicy
from sct_edge.model.spectral import truncated_svd
from sct_edge.store.shardfile import DATA_ALIGN
from sct_edge.store.store import STATE_DTYPES, Store, block_shard, store_layout

FULL_SVD_MAX_DIM = 2048
RANDOMIZED_MAX_FRACTION = 0.25
OVERSAMPLE = 16
POWER_ITERATIONS = 4
RANDOMIZED_SEED = 0  # the range finder's Gaussian test matrix: fixed, so an import is reproducible
GGUF_MAGIC = b"GGUF"


# ------------------------------------------------------------------------------------------------ the SVD


@dataclass
class Factors:
    """A truncated SVD of one matrix in sct-edge layout, with what it keeps of the original."""

    U: Tensor  # in x k
    s: Tensor  # k
    V: Tensor  # out x k
    kept_energy: float
    rel_error: float
    method: str  # "full" or "randomized"

    @property
    def rank(self) -> int:
        return int(self.s.numel())


def randomized_svd(w: Tensor, q: int, niter: int = POWER_ITERATIONS) -> tuple[Tensor, Tensor, Tensor]:
    """The leading `q` singular triplets of W (n_out x n_in) by a randomized range finder, in float64 and in
    sct-edge layout: U (n_in x q), s (q), V (n_out x q). Deterministic: the test matrix has a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOMIZED_SEED)
        a, sigma, b = torch.svd_lowrank(w.to(torch.float64), q=q, niter=niter)
    # svd_lowrank gives W ≈ a diag(sigma) bᵀ with a (n_out x q), b (n_in x q); it may return them unsorted.
    order = torch.argsort(sigma, descending=True)
    return b[:, order], sigma[order], a[:, order]


def _finish(U: Tensor, s: Tensor, V: Tensor, total: float, method: str) -> Factors:
    # s arrives in float64: in float32 the kept energy of a full-rank SVD would read 1 - 1e-7, an error of 3e-4.
    kept = float((s.to(torch.float64) ** 2).sum() / total) if total > 0 else 1.0
    kept = min(kept, 1.0)  # rounding can push a full-rank sum a hair past ‖W‖²
    return Factors(
        U.to(torch.float32).contiguous(),
        s.to(torch.float32).contiguous(),
        V.to(torch.float32).contiguous(),
        kept,
        math.sqrt(max(0.0, 1.0 - kept)),
        method,
    )


def factorize(
    w: Tensor, rank: int | None = None, energy: float | None = None, randomized: bool | None = None
) -> Factors:
    """Truncated SVD of a dense W (n_out x n_in) at a fixed `rank` or at the smallest rank keeping `energy`.

    `randomized` None picks the method by the module's thresholds; True or False forces it (tests).
    """
    if (rank is None) == (energy is None):
        raise SctError("factorize needs exactly one of rank or energy")
    n_out, n_in = w.shape
    small = min(n_out, n_in)
    if rank is not None and not 1 <= rank <= small:
        raise SctError(f"rank {rank} is outside 1..{small} for a {n_out} x {n_in} matrix")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise SctError(f"energy must be in (0, 1], got {energy}")
    total = float((w.to(torch.float64) ** 2).sum())
    auto = randomized is None
    if energy is not None and total == 0.0:
        rank, energy = 1, None  # a zero matrix keeps all its (zero) energy at any rank
    if rank is not None:
        if auto:
            randomized = rank + OVERSAMPLE <= RANDOMIZED_MAX_FRACTION * small
        if not randomized:
            return _finish(*truncated_svd(w.to(torch.float64), rank=rank), total, "full")
        U, s, V = randomized_svd(w, min(small, rank + OVERSAMPLE))
        return _finish(U[:, :rank], s[:rank], V[:, :rank], total, "randomized")
    if auto:
        randomized = small > FULL_SVD_MAX_DIM and energy < 1.0
    if randomized:
        k = min(small, max(64, small // 16))
        while True:
            q = min(small, k + OVERSAMPLE)
            if q == small or (auto and q > RANDOMIZED_MAX_FRACTION * small):
                # Close to the full spectrum the exact SVD costs no more and is exact.
                break
            U, s, V = randomized_svd(w, q)
            kept = torch.cumsum(s**2, 0) / total
            if kept[-1] >= energy - 1e-12:
                # The fraction is that of the factors actually kept, so the target is met; the values found
                # sit a little below the true ones, so k may exceed the exact SVD's by a little.
                k = min(_rank_for_kept(kept, energy), q)
                return _finish(U[:, :k], s[:k], V[:, :k], total, "randomized")
            k *= 2
    return _finish(*truncated_svd(w.to(torch.float64), energy=energy), total, "full")


def _rank_for_kept(kept: Tensor, energy: float) -> int:
    # Like spectral.rank_for_energy, but `kept` is cumulative over ‖W‖², not over the values seen.
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


# ------------------------------------------------------------------------------------------ rank policy


@dataclass
class RankSpec:
    """How one component's matrices are converted: "dense", "rank" (value k), "energy" (value e), "full", or
    ranks spread by size: "params-ratio" (value R) or "size" (value: store bytes)."""

    mode: str
    value: float | int | None = None

    def describe(self) -> str:
        return {"dense": "dense", "full": "full rank"}.get(self.mode) or f"{self.mode} {self.value:g}"


def component_rank(text: str) -> int | str:
    """A per-component rank flag: an integer, 'dense', 'energy' (follow --energy) or 'full'."""
    if text in ("dense", "energy", "full"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise SctError(f"a component rank is an integer, 'dense', 'energy' or 'full', not '{text}'") from None
    if value < 1:
        raise SctError(f"a component rank must be at least 1, not {value}")
    return value


@dataclass
class ImportPolicy:
    """The rank of every component of an import. Exactly one base choice (`rank`, `energy`, `full_rank` or
    `dense`) applies to attention and MLP; the embedding and LM head stay dense unless a per-component value
    (or `full_rank`) says otherwise. Per-component values: an int, "dense", "energy" or "full"."""

    rank: int | None = None
    energy: float | None = None
    full_rank: bool = False
    dense: bool = False
    params_ratio: float | None = None  # fraction of the dense attention + MLP numbers the factors may store
    size: int | None = None  # target store bytes (weights and AdamW moments)
    components: dict[str, int | str | None] = field(default_factory=dict)

    def resolve(self, config: ModelConfig, source: str | Path) -> dict[str, RankSpec]:
        """The spec of each component present in `config` (no head when it is tied to the embedding)."""
        chosen = [self.rank is not None, self.energy is not None, self.full_rank, self.dense,
                  self.params_ratio is not None, self.size is not None]
        if sum(chosen) != 1:
            raise SctError("give exactly one of --rank R, --energy E, --params-ratio R, --size SIZE, --full-rank "
                           "or --dense")
        if self.params_ratio is not None and not 0.0 < self.params_ratio <= 1.0:
            raise SctError(f"--params-ratio must be in (0, 1], not {self.params_ratio}")
        if self.size is not None and self.size <= 0:
            raise SctError(f"--size must be a positive number of bytes, not {self.size}")
        if self.rank is not None and self.rank < 1:
            raise SctError(f"--rank must be at least 1, not {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise SctError(f"--energy must be in (0, 1], not {self.energy}")
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise SctError(f"unknown component(s) {', '.join(sorted(unknown))} (known: {', '.join(COMPONENTS)})")
        if self.rank is not None:
            base = RankSpec("rank", self.rank)
        elif self.params_ratio is not None:
            base = RankSpec("params-ratio", self.params_ratio)
        elif self.size is not None:
            base = RankSpec("size", self.size)
        elif self.energy is not None:
            base = RankSpec("energy", self.energy)
        else:
            base = RankSpec("full" if self.full_rank else "dense")
        outer = base if self.full_rank else RankSpec("dense")
        specs: dict[str, RankSpec] = {}
        for component in COMPONENTS:
            value = self.components.get(component)
            if component == "head" and config.tie_embeddings:
                if value is not None:
                    raise SctError(f"{source}: the LM head is tied to the embedding (no head matrix): use --embed-rank")
                continue
            if value is None:
                specs[component] = base if component in ("attn", "mlp") else outer
            elif value == "energy":
                if self.energy is None:
                    raise SctError(f"--{component}-rank energy needs --energy E")
                specs[component] = RankSpec("energy", self.energy)
            elif value in ("dense", "full"):
                specs[component] = RankSpec(str(value))
            else:
                specs[component] = RankSpec("rank", int(value))
        return specs


@dataclass
class Matrix:
    """One weight matrix to convert: its rank-policy path, source tensor name and (out, in) shape as a linear map."""

    path: str
    tensor: str
    shape: tuple[int, int]
    component: str


def matrices(config: ModelConfig) -> list[Matrix]:
    """Every weight matrix of `config` in store order. The embedding (vocab x dim as stored) is the linear
    map vocab -> dim, so its (out, in) is (dim, vocab) and the factored matrix is its transpose."""
    out = [Matrix("embed", "embed.weight", (config.dim, config.vocab_size), "embed")]
    block = config.matrix_shapes()
    for i in range(config.n_layers):
        for path in [f"attn.{m}" for m in ATTN_MATRICES] + [f"mlp.{m}" for m in MLP_MATRICES]:
            n_in, n_out = block[path]
            out.append(Matrix(f"layers.{i}.{path}", f"layers.{i}.{path}.weight", (n_out, n_in), path.split(".")[0]))
    if not config.tie_embeddings:
        out.append(Matrix("head", "head.weight", (config.vocab_size, config.dim), "head"))
    return out


def capped_rank_notes(config: ModelConfig, specs: dict[str, RankSpec]) -> list[str]:
    """A note per component whose fixed rank is above the full rank of some of its matrices: those matrices are
    converted at their full rank min(out, in) instead (SmolLM2's k and v have 192 rows, so --rank 256 caps them)."""
    capped: dict[str, list[Matrix]] = {}
    for m in matrices(config):
        spec = specs[m.component]
        if spec.mode == "rank" and spec.value > min(m.shape):
            capped.setdefault(m.component, []).append(m)
    notes = []
    for component, found in capped.items():
        shapes = sorted({(m.shape, min(m.shape)) for m in found})
        what = ", ".join(f"{out} x {n_in} at {full}" for (out, n_in), full in shapes)
        notes.append(f"rank {specs[component].value} is above the full rank of {len(found)} {component} "
                     f"matrices; they keep their full rank ({what})")
    return notes


def fixed_rank(spec: RankSpec, shape: tuple[int, int]) -> int:
    """The rank a "rank" or "full" spec gives a matrix of `shape`: capped at its full rank."""
    return min(shape) if spec.mode == "full" else min(int(spec.value), min(shape))


def rank_policy(config: ModelConfig, specs: dict[str, RankSpec], ranks: dict[str, int]) -> RankPolicy:
    """The store's RankPolicy: a uniform component keeps its rank in its field; energy and full-rank components
    (whose matrices differ) list every matrix in `overrides`, their field holding the largest rank."""
    policy = RankPolicy(attn=None, mlp=None, embed=None, head=None)
    for component, spec in specs.items():
        if spec.mode == "dense":
            continue
        mine = {m.path: ranks[m.path] for m in matrices(config) if m.component == component}
        if spec.mode == "rank":
            setattr(policy, component, int(spec.value))
            policy.overrides.update({path: rank for path, rank in mine.items() if rank != spec.value})  # capped
            continue
        setattr(policy, component, max(mine.values()))
        policy.overrides.update(mine)
    energies = {float(spec.value) for spec in specs.values() if spec.mode == "energy"}
    policy.energy = energies.pop() if energies else None
    return policy


# ------------------------------------------------------------------------------------------------ import


def open_source(path: str | Path) -> SourceModel:
    """A Hugging Face LLaMA directory or a GGUF file, opened by the matching reader."""
    path = Path(path)
    if path.is_dir():
        from sct_edge.convert.hf_checkpoint import read_hf

        return read_hf(path)
    if not path.exists():
        raise SctError(f"{path}: no such file or directory")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise SctError(f"{path}: cannot read ({error.strerror})") from None
    if magic != GGUF_MAGIC and path.suffix.lower() != ".gguf":
        raise SctError(f"{path}: neither a Hugging Face model directory nor a GGUF file")
    from sct_edge.convert.gguf_reader import read_gguf

    return read_gguf(path)


def first_layers(source: SourceModel, n_layers: int) -> SourceModel:
    """The first `n_layers` blocks of `source` with its embedding, final norm and head: a smaller model of the
    same weights for quick checks (`tools/realmodel_report --layers`)."""
    if not 1 <= n_layers <= source.config.n_layers:
        raise SctError(f"{source.path}: layers must be in 1..{source.config.n_layers}, not {n_layers}")
    config = dataclasses.replace(source.config, n_layers=n_layers)
    shapes = {
        name: shape
        for name, shape in source.shapes.items()
        if not name.startswith("layers.") or int(name.split(".")[1]) < n_layers
    }
    return dataclasses.replace(source, config=config, shapes=shapes)


@dataclass
class ImportResult:
    store: Path
    config: ModelConfig
    report: list[dict]
    specs: dict[str, RankSpec]
    seconds: float
    convert_seconds: float  # reading, dequantising and factoring
    write_seconds: float  # writing the store from the staged factors
    notes: list[str] = field(default_factory=list)  # what the import changed of what it was asked (capped ranks)
    blocks: list[dict] = field(default_factory=list)  # calibrated imports: each block's output error and recovery
    calibration_memory: dict = field(default_factory=dict)  # calibrated imports: budget, estimate, spilled
    distillation: dict | None = None  # calibrated imports with distillation: its steps, losses and time


def _source_format(source: SourceModel) -> str:
    return "huggingface" if source.path.is_dir() else "gguf"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _finite(source: SourceModel, name: str) -> Tensor:
    tensor = source.tensor(name)
    # by blocks of rows: a whole-tensor isfinite would add a bool copy (0.5 GB for an 8B model's embedding)
    if not all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(2**24)):
        raise SctError(f"{source.path}: tensor {name} has non-finite values (NaN or infinity)")
    return tensor


def _weight(source: SourceModel, m: Matrix) -> Tensor:
    w = _finite(source, m.tensor)
    # the embedding's rows are tokens: as a linear map vocab -> dim it is (dim x vocab)
    return w.T if m.component == "embed" else w


def _convert(source: SourceModel, m: Matrix, spec: RankSpec, allocated: dict[str, int]) -> Factors:
    w = _weight(source, m)
    try:
        if spec.mode == "energy":
            return factorize(w, energy=float(spec.value))
        if spec.mode in SIZED:
            return factorize(w, rank=allocated[m.path])
        return factorize(w, rank=fixed_rank(spec, m.shape))
    except torch.linalg.LinAlgError as error:
        raise SctError(f"{source.path}: the SVD of tensor {m.tensor} failed ({error})") from None


SIZED = ("params-ratio", "size")  # the modes whose ranks are spread across matrices by `allocate_ranks`


def numbers_budget(config: ModelConfig, specs: dict[str, RankSpec], state_dtype: str, tokenizer_bytes: int = 0) -> int:
    """Stored numbers the matrices of the sized components may take: --params-ratio R of their dense numbers,
    or what --size leaves after everything else the store holds (each number is a float32 weight and two AdamW
    moments in the state dtype; the tokenizer, the manifest, and each shard's header, padded to a page)."""
    sized = [m for m in matrices(config) if specs[m.component].mode in SIZED]
    spec = specs[sized[0].component]
    if spec.mode == "params-ratio":
        return math.floor(float(spec.value) * sum(m.shape[0] * m.shape[1] for m in sized))
    per_number = 4 + 2 * STATE_DTYPES[state_dtype].itemsize
    others = config.n_layers * 2 * config.dim + config.dim  # RMSNorm gains
    for m in matrices(config):
        other = specs[m.component]
        if other.mode in SIZED:
            continue
        if other.mode == "energy":
            raise SctError(f"--size cannot count the {m.component} matrices, whose ranks follow --energy: "
                           f"give them a rank, 'full' or 'dense'")
        rank = None if other.mode == "dense" else fixed_rank(other, m.shape)
        others += matrix_params(m.shape[1], m.shape[0], rank)
    # Shard headers: the tensor count of each shard is the layout's whatever the ranks; an entry of the safetensors
    # JSON header takes well under 96 bytes, and the header is padded so the data starts on a page.
    shape_only = RankPolicy(**{c: None if specs.get(c, RankSpec("dense")).mode == "dense" else 1 for c in COMPONENTS})
    headers = sum(
        DATA_ALIGN * math.ceil((8 + 96 * len(tensors)) / DATA_ALIGN)
        for _, tensors in store_layout(config.with_ranks(shape_only), state_dtype).values()
    )
    # The manifest: config, rank overrides and the import report, a few hundred bytes a matrix (an allowance).
    manifest = 16 * 1024 + 384 * len(matrices(config))
    budget = (int(spec.value) - headers - manifest - tokenizer_bytes) // per_number - others
    floor = sum(m.shape[0] + m.shape[1] + 1 for m in sized)
    if budget < floor:
        raise SctError(f"--size {int(spec.value):,} bytes is too small: the rest of the model already takes "
                       f"{others * per_number:,} bytes and rank 1 everywhere needs {floor * per_number:,} more")
    return budget


def allocate(
    source: SourceModel,
    specs: dict[str, RankSpec],
    state_dtype: str,
    tokens: Tensor | None,
    on_progress: Callable[[str, int, int], None] | None = None,
    streams: Activations | None = None,
) -> dict[str, int]:
    """The rank of every matrix of a sized component (--params-ratio, --size), spread by output error per stored
    number on the calibration `tokens`, or by weight error (the plain SVD's) without them. {} when none is sized."""
    sized = [m for m in matrices(source.config) if specs[m.component].mode in SIZED]
    if not sized:
        return {}
    budget = numbers_budget(source.config, specs, state_dtype, len(source.tokenizer.to_json().encode()))
    if tokens is not None:
        gains = output_gains(source, tokens, {m.path for m in sized}, on_progress, streams)
    else:
        gains = {}
        for done, m in enumerate(sized, 1):
            power = torch.linalg.svdvals(_weight(source, m).to(torch.float64)) ** 2
            gains[m.path] = power / power.sum().clamp_min(1e-300)
            if on_progress is not None:
                on_progress("measuring spectra", done, len(sized))
    return allocate_ranks([RankCandidate(m.path, m.shape, gains[m.path]) for m in sized], budget)


def expected_config(config: ModelConfig, specs: dict[str, RankSpec], allocated: dict[str, int]) -> ModelConfig:
    """The converted model's config as far as it is known before the conversion: fixed and sized ranks exactly,
    ranks by energy at their least (1), since the spectra decide them."""
    ranks = {}
    for m in matrices(config):
        spec = specs[m.component]
        if spec.mode != "dense":
            ranks[m.path] = (1 if spec.mode == "energy" else allocated[m.path] if spec.mode in SIZED
                             else fixed_rank(spec, m.shape))
    return config.with_ranks(rank_policy(config, specs, ranks))


def import_model(
    source: SourceModel | str | Path,
    store: str | Path,
    policy: ImportPolicy,
    *,
    state_dtype: str = "float32",
    calibration: CalibrationConfig | None = None,
    on_matrix: Callable[[dict, int, int], None] | None = None,
    on_shard: Callable[[str, int, int], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_block: Callable[[dict], None] | None = None,
) -> ImportResult:
    """Convert `source` into a new store at `store` (a new or empty directory) under `policy`.

    With `calibration`, the attention and MLP matrices are converted block by block with output-aware factors
    measured on its text (`sct_edge.convert.calibration`), then recovered block-wise when it asks for that; the
    embedding and head, when not dense, take the plain SVD. `on_matrix(report_row, done, total)` follows the
    plain conversions, `on_progress(phase, blocks_done, blocks)` the calibrated passes, `on_shard(name,
    bytes_done, bytes_total)` the store writing, `on_block(row)` each calibrated block as it is finished (its
    output errors and recovery). With `calibration.budget`, the import checks up front that it fits (`memory_plan`:
    SctError when even one block cannot) and spills its activation streams to files in the staging directory,
    next to the store, when they would not fit in RAM. On any failure nothing is left behind: the staging files
    (spilled activations included) go, and so does the store directory if this call created it.
    """
    started = time.perf_counter()
    if not isinstance(source, SourceModel):
        source = open_source(source)
    store = Path(store)
    if state_dtype not in STATE_DTYPES:
        raise SctError(f"state dtype '{state_dtype}' is not one of {', '.join(STATE_DTYPES)}")
    if store.exists() and (not store.is_dir() or any(store.iterdir())):
        raise SctError(f"{store} already exists and is not empty: a store is imported into a new or empty directory")
    specs = policy.resolve(source.config, source.path)
    notes = capped_rank_notes(source.config, specs)
    text = None
    if calibration is not None:
        seq_len = min(calibration.seq_len, source.config.max_seq_len)
        text = calibration_text(calibration.paths, source.tokenizer, calibration.tokens, seq_len,
                                source.chat_template)
        try:
            plan = memory_plan(source.config, text.n_tokens, seq_len, calibration.budget)
        except SctError as error:
            raise SctError(f"{source.path}: {error}") from None
        if calibration.spill is not None:
            plan.spill = calibration.spill
    todo = [m for m in matrices(source.config) if specs[m.component].mode != "dense"]
    if calibration is not None and calibration.distill is not None and not any(
            m.path.startswith("layers.") for m in todo):
        raise SctError(f"{source.path}: distillation trains the blocks' factors, and every attention and MLP matrix "
                       f"stays dense here")
    created = not store.exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{store.name}.import-", dir=_existing_ancestor(store.parent)))
    streams = Activations(staging / "activations" if text is not None and plan.spill else None)
    try:
        allocated = allocate(source, specs, state_dtype, None if text is None else text.tokens, on_progress, streams)
        allocated_at = time.perf_counter()
        distill = None if text is None else calibration.distill
        if distill is not None:
            # A budget that cannot hold the distillation step is refused now, not after the conversion.
            try:
                distill_plan(expected_config(source.config, specs, allocated), calibration.profile,
                             *text.tokens.shape, distill)
            except SctError as error:
                raise SctError(f"{source.path}: distillation: {error}") from None
        teacher = None
        report, block_rows = [], []

        def stage(path: str, U: Tensor, s: Tensor, V: Tensor) -> None:
            try:
                save_file({"U": U.contiguous(), "s": s.contiguous(), "V": V.contiguous()},
                          staging / f"{path}.safetensors")
            except OSError as error:
                raise SctError(f"{staging}: cannot write the staged factors of {path} ({error.strerror})") from None

        plain = todo if text is None else [m for m in todo if not m.path.startswith("layers.")]
        for done, m in enumerate(plain, 1):
            factors = _convert(source, m, specs[m.component], allocated)
            stage(m.path, factors.U, factors.s, factors.V)
            row = {
                "matrix": m.path,
                "rank": factors.rank,
                "kept_energy": factors.kept_energy,
                "rel_error": factors.rel_error,
                "shape": list(m.shape),
                "svd": factors.method,
            }
            report.append(row)
            del factors
            if on_matrix is not None:
                on_matrix(row, done, len(plain))
        if text is not None and len(plain) < len(todo):  # some block matrix is converted

            def choose_rank(path: str, spectrum: OutputSpectrum, shape: tuple[int, int]) -> int | None:
                spec = specs[path.split(".")[2]]
                if spec.mode == "dense":
                    return None
                if spec.mode == "energy":
                    return spectrum.rank_for_output_energy(float(spec.value))
                return allocated[path] if spec.mode in SIZED else fixed_rank(spec, shape)

            def finish_block(result: BlockResult) -> None:
                for r in result.matrices:
                    stage(r.path, r.U, r.s, r.V)
                    report.append({
                        "matrix": r.path,
                        "rank": r.rank,
                        "kept_energy": r.weight_energy,
                        "output_energy": r.output_energy,
                        "rel_error": math.sqrt(max(0.0, 1.0 - r.weight_energy)),
                        "shape": list(r.shape),
                        "svd": "output-aware",
                    })
                block_rows.append({"block": result.layer, "error_before": result.error_before,
                                   "error_after": result.error_after, **result.recovery})
                if on_block is not None:
                    on_block(block_rows[-1])

            recovery = calibration.recovery
            recover = None
            if recovery is not None and recovery.steps > 0:
                if recovery.micro_tokens is None:
                    width = max(source.config.ffn_dim, source.config.dim)
                    recovery = dataclasses.replace(recovery, micro_tokens=chunk_tokens(width))

                def recover(block, inputs, targets, layer):
                    return recover_block(block, inputs, targets, layer, recovery)

            teacher = convert_blocks(source, text.tokens, choose_rank, sequential=calibration.sequential,
                                     recover=recover, on_block=finish_block, on_progress=on_progress, streams=streams)
            order = {m.path: i for i, m in enumerate(matrices(source.config))}
            report.sort(key=lambda row: order[row["matrix"]])
        converted = time.perf_counter()
        ranks = {row["matrix"]: row["rank"] for row in report}
        config = source.config.with_ranks(rank_policy(source.config, specs, ranks))
        config.validate()
        method = {
            "method": "svd" if text is None else "output-aware",
            "notes": notes,
            "seconds": {"allocating": allocated_at - started, "converting": converted - allocated_at},
        }
        if allocated:
            method["budget_numbers"] = numbers_budget(source.config, specs, state_dtype,
                                                      len(source.tokenizer.to_json().encode()))
        if text is not None:
            method["calibration"] = {
                "files": text.files,
                "tokens": text.n_tokens,
                "sequences": int(text.tokens.shape[0]),
                "seq_len": int(text.tokens.shape[1]),
                "statistics": "sequential" if calibration.sequential else "dense",
                "memory": {"budget": calibration.budget, "estimate": plan.resident, "spilled": plan.spill},
            }
            method["recovery"] = (None if calibration.recovery is None
                                  else dataclasses.asdict(calibration.recovery))
            method["blocks"] = block_rows
        extra = {
            "import_report": report,
            "import": method,
            "imported_from": {
                "path": str(source.path.resolve()),
                "format": _source_format(source),
                "policy": {c: s.describe() for c, s in specs.items()},
            },
        }
        if source.chat_template is not None:
            extra["chat_template"] = source.chat_template

        def staged(path: str, key: str) -> dict[str, Tensor]:
            factors = load_file(staging / f"{path}.safetensors")
            return {f"{key}.{name}": factors[name] for name in ("U", "s", "V")}

        def matrix(path: str, key: str, tensor: str) -> dict[str, Tensor]:
            return staged(path, key) if path in ranks else {f"{key}.weight": _finite(source, tensor)}

        by_layer: dict[int, list[Matrix]] = {}
        for m in matrices(config):
            if m.path.startswith("layers."):
                by_layer.setdefault(int(m.path.split(".")[1]), []).append(m)
        blocks = {block_shard(i): i for i in by_layer}

        def shard(name: str) -> dict[str, Tensor]:
            if name == "embed":
                return matrix("embed", "embed", "embed.weight")
            if name == "head":
                tensors = {"norm.weight": _finite(source, "norm.weight")}
                if not config.tie_embeddings:
                    tensors.update(matrix("head", "head", "head.weight"))
                return tensors
            prefix = f"layers.{blocks[name]}."
            tensors = {key: _finite(source, prefix + key) for key in ("attn_norm.weight", "mlp_norm.weight")}
            for m in by_layer[blocks[name]]:
                tensors.update(matrix(m.path, m.path.removeprefix(prefix), m.tensor))
            return tensors

        written = Store.create(
            store,
            config,
            state_dtype=state_dtype,
            tokenizer_json=source.tokenizer.to_json(),
            extra=extra,
            tensors=shard,
            progress=on_shard,
        )
        written_at = time.perf_counter()
        distilled = None
        if distill is not None:
            with written.lock():
                distilled = distill_store(written, text.tokens, teacher, distill, calibration.profile, on_progress)
                method["distillation"] = {**dataclasses.asdict(distill), **distilled}
                written.commit(0, extra=extra)
        written.close()
    except BaseException:
        if created and store.exists():
            shutil.rmtree(store, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    finished = time.perf_counter()
    return ImportResult(
        store=store,
        config=config,
        report=report,
        specs=specs,
        seconds=finished - started,
        convert_seconds=converted - started,
        write_seconds=written_at - converted,
        notes=notes,
        blocks=block_rows,
        calibration_memory=method.get("calibration", {}).get("memory", {}),
        distillation=method.get("distillation"),
    )
