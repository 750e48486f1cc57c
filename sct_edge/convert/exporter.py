"""Export a store as a dense Hugging Face LLaMA directory (config.json, safetensors, tokenizer.json,
tokenizer_config.json with the chat template), loadable by the usual tools.

Each dense matrix W = V diag(s) Uᵀ (out x in) is built from its shard's factors only when the writer asks
for it and is written before the next is built, so peak memory is one dense matrix plus the shard it comes
from, never the model. This is the one place besides tests where sct-edge builds dense matrices.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sct_edge.convert.hf_checkpoint import DEFAULT_MAX_SHARD_BYTES, write_hf
from sct_edge.convert.source_model import expected_shapes
from sct_edge.convert.tokenizer import tokenizer_from_json
from sct_edge.errors import SctError
from sct_edge.model.transformer import Transformer
from sct_edge.store.atomic import fsync_dir
from sct_edge.store.shard_names import block_shard, param_prefix
from sct_edge.store.store import MANIFEST, Store

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dense_matrix(tensors: dict[str, Tensor], key: str) -> Tensor:
    """The dense nn.Linear weight (out x in) of matrix `key` ("attn.q", "head", ...) in a shard's tensors."""
    if f"{key}.weight" in tensors:
        return tensors[f"{key}.weight"]
    U, s, V = tensors[f"{key}.U"], tensors[f"{key}.s"], tensors[f"{key}.V"]
    return (V * s) @ U.T


def _locate(name: str) -> tuple[str, str]:
    """(shard, key inside the shard) of a dense tensor name in sct-edge naming."""
    if name.startswith("embed."):
        return "embed", name
    if name in ("norm.weight", "head.weight"):
        return "head", name
    _, layer, key = name.split(".", 2)
    return block_shard(int(layer)), key


def dense_tensors(store: Store) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of the store's model in dense Hugging Face order and sct-edge naming, one at a time.

    Shards are read (memory-mapped) as the names reach them and released once their last tensor was taken;
    a consumer must be done with a tensor before asking for the next (write_hf is).
    """
    current: str | None = None
    tensors: dict[str, Tensor] = {}
    for name in expected_shapes(store.config):
        shard, key = _locate(name)
        if shard != current:
            if current is not None:
                tensors = {}
                store.release(current)
            current, tensors = shard, store.read(shard)
        if key == "embed.weight":
            # The embedding as a linear map is vocab -> dim; its rows (the stored layout) are its transpose.
            yield name, tensors["embed.weight"] if "embed.weight" in tensors else dense_matrix(tensors, "embed").T
        elif key.endswith(".weight") and key in tensors:
            yield name, tensors[key]
        else:
            yield name, dense_matrix(tensors, key.removesuffix(".weight"))
    if current is not None:
        tensors = {}
        store.release(current)


def in_memory_model(store: Store) -> Transformer:
    """The store's model as one in-memory `Transformer` with the stored factors (copied out of the maps), for
    small models only: checks and tests that need logits; training and generation page blocks instead."""
    model = Transformer(store.config, device="meta")
    state: dict[str, Tensor] = {}
    for name in store.weight_shard_names():
        prefix = param_prefix(name)
        state.update({prefix + key: tensor.clone() for key, tensor in store.read(name).items()})
        store.release(name)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    bytes: int
    seconds: float


def export_store(
    store_path: str | Path,
    out: str | Path,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportResult:
    """Write the store at `store_path` as a dense Hugging Face LlamaForCausalLM directory `out`."""
    started = time.perf_counter()
    if dtype not in EXPORT_DTYPES:
        raise SctError(f"export dtype '{dtype}' is not one of {', '.join(EXPORT_DTYPES)}")
    store_path, out = Path(store_path), Path(out)
    if out.exists() and out.resolve() == store_path.resolve():
        raise SctError(f"{out}: the export directory must not be the store itself")
    if (out / MANIFEST).exists():
        raise SctError(f"{out} holds an sct-edge store: export into a new directory")
    if out.exists() and not out.is_dir():
        raise SctError(f"{out} exists and is not a directory")
    with Store.open(store_path) as store:
        tokenizer = tokenizer_from_json(store.tokenizer_json())
        chat_template = store.extra.get("chat_template")
        # Written whole in a staging directory beside `out`, then moved in: a failure or a signal part-way
        # leaves `out` as it was (absent, or with its earlier files), never half an export.
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
        except OSError as error:
            raise SctError(f"{out}: cannot create the export directory ({error.strerror or error})") from None
        try:
            write_hf(
                staging,
                store.config,
                dense_tensors(store),
                tokenizer,
                chat_template=chat_template,
                max_shard_bytes=max_shard_bytes,
                dtype=EXPORT_DTYPES[dtype],
            )
            if out.exists():
                for written in sorted(staging.iterdir()):
                    os.replace(written, out / written.name)
            else:
                os.replace(staging, out)
            fsync_dir(out)
            fsync_dir(out.parent)
        except OSError as error:
            raise SctError(f"{out}: cannot write the export ({error.strerror or error})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    return ExportResult(out=out, files=files, bytes=size, seconds=time.perf_counter() - started)
