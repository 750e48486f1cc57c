"""Names of a store's shards and of their versioned files: built and parsed here and nowhere else.

A model is stored as the shards `embed`, `block.000` ... `block.NNN`, `head`, each with its AdamW moments
in `NAME.optim` and, in a store trained by replicas in DiLoCo mode, its outer state in `NAME.outer`.
Every committed version of a shard is a file `NAME.vVVVVVV.safetensors`.
"""

from __future__ import annotations

import re

EMBED = "embed"
HEAD = "head"
OPTIM_SUFFIX = ".optim"
OUTER_SUFFIX = ".outer"

_BLOCK = re.compile(r"^block\.(\d+)$")
_SHARD_FILE = re.compile(r"^(embed|head|block\.\d+)((?:\.optim|\.outer)?)\.v(\d+)\.safetensors$")


def block_shard(layer: int) -> str:
    """The weights shard of decoder block `layer` ("block.007")."""
    return f"block.{layer:03d}"


def optim_shard(name: str) -> str:
    """The AdamW-moments shard of weights shard `name` ("block.007.optim")."""
    return f"{name}{OPTIM_SUFFIX}"


def outer_shard(name: str) -> str:
    """The DiLoCo outer-state shard of weights shard `name` ("block.007.outer": anchor and outer momentum)."""
    return f"{name}{OUTER_SUFFIX}"


def is_optim(name: str) -> bool:
    """Whether shard `name` holds AdamW moments rather than weights."""
    return name.endswith(OPTIM_SUFFIX)


def weights_shard(name: str) -> str:
    """The weights shard that shard `name` belongs to (itself, or the one whose moments it holds)."""
    return name.removesuffix(OPTIM_SUFFIX).removesuffix(OUTER_SUFFIX)


def block_index(name: str) -> int | None:
    """The decoder layer of a block's weights or moments shard (7 for "block.007" and "block.007.optim");
    None for embed and head."""
    match = _BLOCK.match(weights_shard(name))
    return int(match.group(1)) if match else None


def param_prefix(name: str) -> str:
    """What turns a key of shard `name` into the model-level parameter name ("layers.3." for block.003)."""
    layer = block_index(name)
    return "" if layer is None else f"layers.{layer}."


def shard_file_name(name: str, version: int) -> str:
    """The file name of version `version` of shard `name` ("block.007.v000012.safetensors")."""
    return f"{name}.v{version:06d}.safetensors"


def parse_shard_file(file: str) -> tuple[str, int] | None:
    """(shard name, version) of a shard file name; None for any other name (a path with a directory too)."""
    match = _SHARD_FILE.match(file)
    return None if match is None else (match.group(1) + match.group(2), int(match.group(3)))
