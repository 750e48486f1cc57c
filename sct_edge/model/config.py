"""Model configuration (`ModelConfig`), per-component rank policy (`RankPolicy`) and the named presets.

A config describes the architecture; the rank policy says which weight matrices are spectral
(W = U diag(s) Vᵀ) and at which rank. Both serialise to plain JSON for the store's manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sct_edge.errors import SctError

COMPONENTS = ("attn", "mlp", "embed", "head")
ATTN_MATRICES = ("q", "k", "v", "o")
MLP_MATRICES = ("gate", "up", "down")


@dataclass
class RankPolicy:
    """Rank per component; None keeps that component dense (`nn.Linear` / `nn.Embedding`).

    `overrides` maps a matrix path (e.g. "layers.3.mlp.up", "embed", "head") to its exact rank;
    energy-based imports fill it so that every matrix keeps its own rank.
    """

    attn: int | None = 32
    mlp: int | None = 32
    embed: int | None = None
    head: int | None = None
    energy: float | None = None
    overrides: dict[str, int] = field(default_factory=dict)

    @classmethod
    def uniform(cls, rank: int | None, dense_embeddings: bool = False) -> RankPolicy:
        embed = None if dense_embeddings else rank
        return cls(attn=rank, mlp=rank, embed=embed, head=embed)

    def rank_of(self, path: str) -> int | None:
        """Rank of the matrix at `path` ("layers.{i}.attn.q", "layers.{i}.mlp.down", "embed", "head")."""
        if path in self.overrides:
            return self.overrides[path]
        if path in ("embed", "head"):
            return getattr(self, path)
        component = path.split(".")[2]
        return getattr(self, component)


ATTENTIONS = ("causal", "additive")
# Stores and run events written before the rename call the additive attention "seed"; they still open.
FORMER_ATTENTION_NAMES = {"seed": "additive"}


@dataclass
class ModelConfig:
    """A LLaMA-family decoder: RMSNorm → causal GQA attention with RoPE → RMSNorm → SwiGLU MLP."""

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # "causal": softmax attention with RoPE and a causal mask. "additive": the seeds' simplified 70B-class step,
    # o(q + k + v) with no softmax and no mask (needs full-size k/v, i.e. n_kv_heads == n_heads).
    attention: str = "causal"
    ranks: RankPolicy = field(default_factory=RankPolicy)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every weight matrix of one block, keyed by its path inside the block."""
        d, kv, f = self.dim, self.kv_dim, self.ffn_dim
        return {
            "attn.q": (d, d),
            "attn.k": (d, kv),
            "attn.v": (d, kv),
            "attn.o": (d, d),
            "mlp.gate": (d, f),
            "mlp.up": (d, f),
            "mlp.down": (f, d),
        }

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise SctError(f"config {self.name}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise SctError(
                f"config {self.name}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.attention not in ATTENTIONS:
            raise SctError(f"config {self.name}: attention must be 'causal' or 'additive', not '{self.attention}'")
        if self.attention == "additive" and self.n_kv_heads != self.n_heads:
            raise SctError(f"config {self.name}: additive attention o(q+k+v) needs n_kv_heads == n_heads")
        if self.head_dim % 2:
            raise SctError(f"config {self.name}: head_dim {self.head_dim} must be even for RoPE")
        shapes = {f"layers.0.{p}": s for p, s in self.matrix_shapes().items()}
        shapes["embed"] = (self.vocab_size, self.dim)
        shapes["head"] = (self.dim, self.vocab_size)
        for path, (n_in, n_out) in shapes.items():
            for i in range(self.n_layers if path.startswith("layers.") else 1):
                real = path.replace("layers.0.", f"layers.{i}.")
                rank = self.ranks.rank_of(real)
                if rank is not None and not 1 <= rank <= min(n_in, n_out):
                    raise SctError(
                        f"config {self.name}: rank {rank} for {real} is outside 1..{min(n_in, n_out)} "
                        f"(the matrix is {n_in} x {n_out})"
                    )
                if path.startswith("layers.") and real not in self.ranks.overrides:
                    break  # every layer shares the component rank; checking one is enough

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        ranks = RankPolicy(**data.pop("ranks", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SctError(f"model config has unknown fields: {', '.join(sorted(unknown))}")
        if "attention" in data:
            data["attention"] = FORMER_ATTENTION_NAMES.get(data["attention"], data["attention"])
        return cls(ranks=ranks, **data)

    def with_ranks(self, ranks: RankPolicy) -> ModelConfig:
        return dataclasses.replace(self, ranks=ranks)


PRESETS: dict[str, ModelConfig] = {
    # The embedded default: byte-level vocabulary, learns visibly in minutes on two CPU cores.
    "tiny": ModelConfig(
        name="tiny", vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
        max_seq_len=256, ranks=RankPolicy(attn=32, mlp=32, embed=None, head=None),
    ),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
        max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
        ranks=RankPolicy(attn=32, mlp=32, embed=None, head=None),
    ),
    "llama3-8b": ModelConfig(
        name="llama3-8b", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        max_seq_len=8192, rope_theta=500000.0, ranks=RankPolicy.uniform(32),
    ),
    "llama3-70b": ModelConfig(
        name="llama3-70b", vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
        max_seq_len=8192, rope_theta=500000.0, ranks=RankPolicy.uniform(32),
    ),
    # The seeds' 70B-class: LLaMA-3-70B proportions but full-size (8192 x 8192) k and v projections.
    "sct-70b": ModelConfig(
        name="sct-70b", vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, ffn_dim=28672,
        max_seq_len=8192, rope_theta=500000.0, ranks=RankPolicy.uniform(32),
    ),
    "llama3-405b": ModelConfig(
        name="llama3-405b", vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
        ffn_dim=53248, max_seq_len=8192, rope_theta=500000.0, ranks=RankPolicy.uniform(32),
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset; an unknown name is a `SctError` listing the known ones."""
    if name not in PRESETS:
        raise SctError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return ModelConfig.from_dict(PRESETS[name].to_dict())
