"""`SourceModel`: what a reader of a foreign checkpoint (GGUF, Hugging Face safetensors) hands the importer.

A reader validates names and shapes up front without reading tensor data, then `tensors()` yields one
dense float32 tensor at a time in sct-edge's naming and nn.Linear layout, so an importer's peak memory is
about one dense matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sct_edge.convert.tokenizer import Tokenizer
from sct_edge.errors import SctError
from sct_edge.model.config import ATTN_MATRICES, MLP_MATRICES, ModelConfig, RankPolicy


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every dense tensor of `config` in sct-edge naming, in checkpoint order, with its (out, in) shape."""
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (config.vocab_size, config.dim)}
    block = config.matrix_shapes()
    for i in range(config.n_layers):
        shapes[f"layers.{i}.attn_norm.weight"] = (config.dim,)
        for m in ATTN_MATRICES:
            n_in, n_out = block[f"attn.{m}"]
            shapes[f"layers.{i}.attn.{m}.weight"] = (n_out, n_in)
        shapes[f"layers.{i}.mlp_norm.weight"] = (config.dim,)
        for m in MLP_MATRICES:
            n_in, n_out = block[f"mlp.{m}"]
            shapes[f"layers.{i}.mlp.{m}.weight"] = (n_out, n_in)
    shapes["norm.weight"] = (config.dim,)
    if not config.tie_embeddings:
        shapes["head.weight"] = (config.vocab_size, config.dim)
    return shapes


def validate_architecture(config: ModelConfig, source: str | Path) -> None:
    """`config.validate()` for the architecture alone (ranks are the importer's choice, made later)."""
    try:
        config.with_ranks(RankPolicy(attn=None, mlp=None, embed=None, head=None)).validate()
    except SctError as error:
        raise SctError(f"{source}: {error}") from None


def check_shapes(config: ModelConfig, found: dict[str, tuple[int, ...]], source: str | Path) -> None:
    """SctError naming `source` when a tensor `config` needs is missing or has the wrong shape."""
    for name, shape in expected_shapes(config).items():
        if name not in found:
            raise SctError(f"{source}: missing tensor {name}")
        if tuple(found[name]) != shape:
            raise SctError(f"{source}: tensor {name} has shape {list(found[name])}, the config implies {list(shape)}")


@dataclass
class SourceModel:
    """A foreign checkpoint opened for import. `config.ranks` is left at its default: the importer sets it."""

    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: str | None
    path: Path
    shapes: dict[str, tuple[int, ...]]
    load: Callable[[str], torch.Tensor] = field(repr=False)

    def tensor_names(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, name: str) -> torch.Tensor:
        """One dense float32 tensor, read (and dequantised) now."""
        if name not in self.shapes:
            raise SctError(f"{self.path}: no tensor {name}")
        return self.load(name)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.shapes:
            yield name, self.load(name)
