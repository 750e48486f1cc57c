"""The LLaMA-family decoder in spectral or dense form.

Token embedding → blocks of (RMSNorm → causal self-attention with RoPE and grouped KV heads → RMSNorm →
SwiGLU MLP) → final RMSNorm → LM head, tied or untied. Which matrices are spectral, and at which rank,
comes from `config.ranks`; `spectral=False` builds the same architecture with dense `nn.Linear`s for
quality comparisons and export checks.

Blocks are self-contained modules whose forward takes the RoPE tables as arguments, so the scheduler
can run block i with parameters supplied from the store (`torch.func.functional_call` on a block built
on the meta device) without ever holding the whole model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sct_edge.model import attention
from sct_edge.model.config import ModelConfig
from sct_edge.model.memo import BlockMemo, causal_attention, replays_attention
from sct_edge.model.products import product
from sct_edge.model.rmsnorm import rms_norm, rms_norm_and_pass
from sct_edge.model.rope import apply_rope, rope_tables
from sct_edge.model.spectral import (
    SharedInputProjections,
    SpectralLinear,
    init_scale,
    random_orthonormal,
    rank_out,
    spectral_apply,
)
from sct_edge.model.swiglu import slices_pay_off, spectral_swiglu


def block_seed(seed: int, name: str) -> int:
    """A stable per-part seed, so a block initialised alone equals the same block of a whole model."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def make_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(block_seed(seed, name))


def make_linear(
    n_in: int, n_out: int, rank: int | None, std: float, generator: torch.Generator | None, device=None
) -> nn.Module:
    """A bias-free linear map: spectral at `rank`, or dense (`DenseLinear`, an `nn.Linear`) when rank is None."""
    if rank is not None:
        return SpectralLinear(n_in, n_out, rank, std=std, generator=generator, device=device)
    layer = DenseLinear(n_in, n_out, bias=False, device="meta" if _is_meta(device) else None)
    if not _is_meta(device):
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n_out, n_in, generator=generator) * std)
    return layer


class DenseLinear(nn.Linear):
    """`nn.Linear` without bias whose float32 products take the CPU's own GEMM (`sct_edge/model/products.py`)."""

    def forward(self, x: Tensor) -> Tensor:
        return product(x, self.weight)


def _is_meta(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device="meta" if _is_meta(device) else None))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def and_pass(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(norm of x, x) for a residual stream, whose gradient this norm's backward then sums (`rms_norm_and_pass`)."""
        return rms_norm_and_pass(x, self.weight, self.eps)


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, for one block during generation."""

    k: Tensor | None = None
    v: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, generator, device=None) -> None:
        super().__init__()
        self.config = config
        d, kv = config.dim, config.kv_dim
        out_std = 1.0 / math.sqrt(d) / math.sqrt(2 * config.n_layers)
        rank = config.ranks.rank_of
        self.q = make_linear(d, d, rank(f"layers.{layer}.attn.q"), 1 / math.sqrt(d), generator, device)
        self.k = make_linear(d, kv, rank(f"layers.{layer}.attn.k"), 1 / math.sqrt(d), generator, device)
        self.v = make_linear(d, kv, rank(f"layers.{layer}.attn.v"), 1 / math.sqrt(d), generator, device)
        self.o = make_linear(d, d, rank(f"layers.{layer}.attn.o"), out_std, generator, device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                memo: BlockMemo | None = None, residual: Tensor | None = None) -> Tensor:
        """The attention output projected by o, plus `residual` when given (the block's input)."""
        if self.config.attention == "additive":
            return _plus(self.o(self.q(x) + self.k(x) + self.v(x)), residual)
        b, t, _ = x.shape
        c = self.config
        q, k, v = self._qkv(x, memo)
        q = q.view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = k.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v)
        mask = None
        causal = k.shape[2] == t
        if not causal and t > 1:
            # New queries sit at the end of the cached sequence: query i sees keys up to past + i.
            past = k.shape[2] - t
            mask = torch.ones(t, k.shape[2], dtype=torch.bool).tril(past)
        if memo is not None and causal and t > 1 and replays_attention(q):
            y = causal_attention(q, k, v, memo)  # recorded in forward, replayed in the recompute (model/memo.py)
        elif causal and attention.routed(q, c.n_kv_heads):
            y = attention.CausalAttention.apply(q, k, v)  # the products on the CPU's own GEMM (model/attention.py)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and t > 1, enable_gqa=c.n_kv_heads != c.n_heads
            )
        return self._out(y.transpose(1, 2).reshape(b, t, c.dim), memo, residual)

    def _qkv(self, x: Tensor, memo: BlockMemo | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v of x: spectral ones share their products with x (one input gradient, recorded in a memo)."""
        maps = (self.q, self.k, self.v)
        if not _fusable(maps):
            return tuple(m(x) for m in maps)
        recorded = memo.qkv_in if memo is not None else None
        projected = SharedInputProjections.apply(x, recorded, *(m.U for m in maps))
        if memo is not None and recorded is None:
            memo.qkv_in = memo.keep(*projected)
        return tuple(rank_out(xu * m.s, m.V) for xu, m in zip(projected, maps, strict=True))

    def _out(self, y: Tensor, memo: BlockMemo | None, residual: Tensor | None) -> Tensor:
        """o(y) + residual, the sum folded into o's last product where it can be (`rank_out`)."""
        if not _fusable((self.o,)):
            return _plus(self.o(y), residual)
        recorded = memo.o_in if memo is not None else None
        (projected,) = SharedInputProjections.apply(y, recorded, self.o.U)
        if memo is not None and recorded is None:
            memo.o_in = memo.keep(projected)
        return rank_out(projected * self.o.s, self.o.V, residual)


def _fusable(maps: tuple[nn.Module, ...]) -> bool:
    """Whether spectral `maps` may be applied by their factors rather than called: not when a hook watches a call
    (calibration's statistics and tests hook q and o)."""
    return all(isinstance(m, SpectralLinear) and not (m._forward_hooks or m._forward_pre_hooks) for m in maps) and not (
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def _plus(y: Tensor, residual: Tensor | None) -> Tensor:
    return y if residual is None else residual + y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, generator, device=None) -> None:
        super().__init__()
        d, f = config.dim, config.ffn_dim
        rank = config.ranks.rank_of
        down_std = 1.0 / math.sqrt(f) / math.sqrt(2 * config.n_layers)
        self.gate = make_linear(d, f, rank(f"layers.{layer}.mlp.gate"), 1 / math.sqrt(d), generator, device)
        self.up = make_linear(d, f, rank(f"layers.{layer}.mlp.up"), 1 / math.sqrt(d), generator, device)
        self.down = make_linear(f, d, rank(f"layers.{layer}.mlp.down"), down_std, generator, device)

    def forward(self, x: Tensor, memo: BlockMemo | None = None, residual: Tensor | None = None) -> Tensor:
        """The MLP's output, plus `residual` when given (the block's stream after attention)."""
        spectral = all(isinstance(m, SpectralLinear) for m in (self.gate, self.up, self.down))
        if spectral and slices_pay_off(x, self.up.n_out):
            # No FFN-wide tensor (model/swiglu.py); with a memo, the recompute skips the slices (model/memo.py).
            return spectral_swiglu(x, self.gate, self.up, self.down, memo=memo, residual=residual)
        return _plus(self.down(F.silu(self.gate(x)) * self.up(x)), residual)


class Block(nn.Module):
    """One decoder block; its forward needs only its own parameters, the input and the RoPE tables."""

    def __init__(self, config: ModelConfig, layer: int, seed: int = 0, device=None) -> None:
        super().__init__()
        generator = None if _is_meta(device) else make_generator(seed, f"layers.{layer}")
        self.attn_norm = RMSNorm(config.dim, config.norm_eps, device)
        self.attn = Attention(config, layer, generator, device)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps, device)
        self.mlp = MLP(config, layer, generator, device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                memo: BlockMemo | None = None) -> Tensor:
        """With a `memo`, a forward under no_grad records what the recompute of the same input replays."""
        # x and h come back through their norms, so each norm's backward also takes the residual's gradient.
        normed, x = self.attn_norm.and_pass(x)
        h = self.attn(normed, cos, sin, cache, memo, residual=x)
        normed, h = self.mlp_norm.and_pass(h)
        return self.mlp(normed, memo, residual=h)


class Embedding(nn.Module):
    """Token embedding; spectral form looks up a row of U, scales by s and projects with V (vocab stays cheap)."""

    def __init__(self, vocab: int, dim: int, rank: int | None, std: float, generator, device=None) -> None:
        super().__init__()
        self.rank = rank
        meta = _is_meta(device)
        if rank is None:
            self.weight = nn.Parameter(torch.empty(vocab, dim, device="meta") if meta else
                                       torch.randn(vocab, dim, generator=generator) * std)
            return
        if meta:
            self.U = nn.Parameter(torch.empty(vocab, rank, device="meta"))
            self.s = nn.Parameter(torch.empty(rank, device="meta"))
            self.V = nn.Parameter(torch.empty(dim, rank, device="meta"))
            return
        # The lookup is x·E with a one-hot x (n_in = vocab), so the dense-equivalent scale follows init_scale.
        self.U = nn.Parameter(random_orthonormal(vocab, rank, generator))
        self.s = nn.Parameter(torch.full((rank,), init_scale(vocab, dim, rank, std)))
        self.V = nn.Parameter(random_orthonormal(dim, rank, generator))

    def forward(self, tokens: Tensor) -> Tensor:
        if self.rank is None:
            return F.embedding(tokens, self.weight)
        # The residual stream starts here and stays float32 under bfloat16 autocast, as with a dense lookup.
        with torch.autocast(tokens.device.type, enabled=False):
            return (F.embedding(tokens, self.U) * self.s) @ self.V.T

    def as_head(self, h: Tensor) -> Tensor:
        return tied_head_logits(dict(self.named_parameters()), h)


def tied_head_logits(embedding: dict[str, Tensor], h: Tensor) -> Tensor:
    """Tied LM head from the embedding's tensors ("weight", or "U", "s", "V"): logits = h Eᵀ = ((h V) * s) Uᵀ."""
    if "weight" in embedding:
        return product(h, embedding["weight"])
    return spectral_apply(h, embedding["V"], embedding["s"], embedding["U"])


def build_head(config: ModelConfig, seed: int = 0, device=None) -> nn.Module | None:
    """The untied LM head (dim -> vocab), or None when it is tied to the embedding."""
    if config.tie_embeddings:
        return None
    generator = None if _is_meta(device) else make_generator(seed, "head")
    rank = config.ranks.rank_of("head")
    return make_linear(config.dim, config.vocab_size, rank, 1 / math.sqrt(config.dim), generator, device)


def build_embedding(config: ModelConfig, seed: int = 0, device=None) -> Embedding:
    generator = None if _is_meta(device) else make_generator(seed, "embed")
    std = 1.0 / math.sqrt(config.dim) if config.tie_embeddings else 1.0
    return Embedding(config.vocab_size, config.dim, config.ranks.rank_of("embed"), std, generator, device)


def dense_config(config: ModelConfig) -> ModelConfig:
    """The same architecture with every matrix dense."""
    from sct_edge.model.config import RankPolicy

    return config.with_ranks(RankPolicy(attn=None, mlp=None, embed=None, head=None))


class Transformer(nn.Module):
    """The whole model in memory: for small presets, references in tests, generation and export checks."""

    def __init__(self, config: ModelConfig, spectral: bool = True, seed: int = 0, device=None) -> None:
        super().__init__()
        config.validate()
        self.config = config if spectral else dense_config(config)
        self.embed = build_embedding(self.config, seed, device)
        self.layers = nn.ModuleList(Block(self.config, i, seed, device) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, device)
        self.head = build_head(self.config, seed, device)

    def forward(self, tokens: Tensor, start_pos: int = 0, caches: list[KVCache] | None = None) -> Tensor:
        positions = torch.arange(start_pos, start_pos + tokens.shape[1])
        cos, sin = rope_tables(self.config, positions)
        h = self.embed(tokens)
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, None if caches is None else caches[i])
        return self.logits(h)

    def logits(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        return self.embed.as_head(h) if self.head is None else self.head(h)
