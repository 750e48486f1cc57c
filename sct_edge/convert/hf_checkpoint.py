"""Hugging Face LLaMA checkpoints: `read_hf` opens a model directory (config.json, one or sharded
safetensors files, tokenizer.json) as a `SourceModel`; `write_hf` writes one from dense tensors, streaming
them one at a time into safetensors shards so peak memory is one tensor, not the model.

Hugging Face's layout is sct-edge's (nn.Linear out x in, rotate-half RoPE): only the names change.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sct_edge.convert.source_model import SourceModel, check_shapes, expected_shapes, validate_architecture
from sct_edge.convert.tokenizer import BPETokenizer, Tokenizer, hf_tokenizer_json, tokenizer_from_hf_json
from sct_edge.errors import SctError
from sct_edge.model.config import ModelConfig
from sct_edge.store.atomic import fsync_dir, publish

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def hf_name(name: str) -> str:
    """The Hugging Face name of an sct-edge dense tensor name ("layers.3.attn.q.weight" -> ...q_proj.weight)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) >= 4 and parts[0] == "layers" and parts[1].isdigit() and parts[-1] == "weight":
        inner = ".".join(parts[2:-1])
        if inner in _BLOCK_NAMES:
            return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[inner]}.weight"
    raise SctError(f"tensor {name} has no Hugging Face LLaMA equivalent")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SctError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SctError(f"{path}: not valid JSON ({error})") from None


def _config_from_hf(data: dict, path: Path, name: str) -> ModelConfig:
    archs = data.get("architectures") or []
    if data.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        kind = data.get("model_type") or ", ".join(archs) or "unknown"
        raise SctError(f"{path}: model type '{kind}' is not supported (only llama / LlamaForCausalLM)")
    if data.get("rope_scaling"):
        raise SctError(f"{path}: rope_scaling {json.dumps(data['rope_scaling'])} is not supported")
    if data.get("attention_bias") or data.get("mlp_bias"):
        raise SctError(f"{path}: attention_bias / mlp_bias are not supported (LLaMA has no biases)")
    if data.get("hidden_act", "silu") != "silu":
        raise SctError(f"{path}: hidden_act '{data['hidden_act']}' is not supported (only silu)")
    try:
        n_heads = int(data["num_attention_heads"])
        config = ModelConfig(
            name=name,
            vocab_size=int(data["vocab_size"]),
            dim=int(data["hidden_size"]),
            n_layers=int(data["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(data.get("num_key_value_heads") or n_heads),
            ffn_dim=int(data["intermediate_size"]),
            max_seq_len=int(data.get("max_position_embeddings", 2048)),
            rope_theta=float(data.get("rope_theta", 10000.0)),
            norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        )
    except KeyError as error:
        raise SctError(f"{path}: missing field {error.args[0]}") from None
    except (TypeError, ValueError) as error:
        raise SctError(f"{path}: a field has the wrong type ({error})") from None
    head_dim = data.get("head_dim")
    if head_dim is not None and n_heads and int(head_dim) != config.dim // n_heads:
        raise SctError(f"{path}: head_dim {head_dim} != hidden_size / num_attention_heads is not supported")
    validate_architecture(config, path)
    return config


def _token_id(value: Any, tokenizer_text: str) -> int | None:
    """A special token's id from tokenizer_config.json's string/dict form, else None."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        return None
    vocab = json.loads(tokenizer_text)
    for added in vocab.get("added_tokens", []):
        if added.get("content") == value:
            return int(added["id"])
    model_vocab = (vocab.get("model") or {}).get("vocab")
    if isinstance(model_vocab, dict) and value in model_vocab:
        return int(model_vocab[value])
    return None


def _first_id(value: Any) -> int | None:
    # config.json may give several EOS ids (LLaMA 3.1); the first is the tokenizer's own EOS.
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def _read_tokenizer(directory: Path, config_data: dict) -> tuple[Tokenizer, str | None]:
    tok_path = directory / "tokenizer.json"
    if not tok_path.is_file():
        raise SctError(f"{tok_path}: no such file (sct-edge needs the fast tokenizer.json)")
    text = tok_path.read_text(encoding="utf-8")
    tok_config_path = directory / "tokenizer_config.json"
    tok_config = _load_json(tok_config_path) if tok_config_path.is_file() else {}
    try:
        bos = _token_id(tok_config.get("bos_token"), text)
        eos = _token_id(tok_config.get("eos_token"), text)
    except ValueError as error:
        raise SctError(f"{tok_path}: not valid JSON ({error})") from None
    bos = bos if bos is not None else _first_id(config_data.get("bos_token_id"))
    eos = eos if eos is not None else _first_id(config_data.get("eos_token_id"))
    tokenizer = tokenizer_from_hf_json(text, bos_id=bos, eos_id=eos)
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is what chat uses
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return tokenizer, template


def _open_safetensors(path: Path) -> Any:
    from safetensors import safe_open

    if not path.is_file():
        raise SctError(f"{path}: no such file")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # SafetensorError for a bad header, OSError for I/O
        raise SctError(f"{path}: not a readable safetensors file, truncated or corrupt ({error})") from None


def read_hf(directory: str | Path) -> SourceModel:
    """Open a Hugging Face LLaMA directory for import; tensor data is read only when `tensors()` is iterated."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SctError(f"{directory}: no such directory")
    config_path = directory / "config.json"
    config_data = _load_json(config_path)
    if not isinstance(config_data, dict):
        raise SctError(f"{config_path}: expected a JSON object")
    config = _config_from_hf(config_data, config_path, directory.resolve().name)

    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map = _load_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise SctError(f"{index_path}: no weight_map")
    elif (directory / SINGLE_FILE).is_file():
        weight_map = None
    else:
        raise SctError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} is there")

    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    handles = {f: _open_safetensors(directory / f) for f in files}
    located: dict[str, str] = {}  # hf name -> the file holding it
    for file, handle in handles.items():
        for key in handle.keys():
            if weight_map is None or weight_map.get(key) == file:
                located[key] = file

    ours: dict[str, str] = {}
    found: dict[str, tuple[int, ...]] = {}
    for name in expected_shapes(config):
        key = hf_name(name)
        if key not in located:
            where = directory / (weight_map.get(key, files[0]) if weight_map is not None else SINGLE_FILE)
            raise SctError(f"{where}: missing tensor {key}")
        ours[name] = located[key]
        found[name] = tuple(handles[located[key]].get_slice(key).get_shape())
    check_shapes(config, found, directory)

    def load(name: str) -> torch.Tensor:
        file = ours[name]
        try:
            tensor = handles[file].get_tensor(hf_name(name))
        except Exception as error:  # data past the end of a truncated file, I/O errors
            raise SctError(f"{directory / file}: cannot read tensor {hf_name(name)} ({error})") from None
        return tensor.to(torch.float32).contiguous()

    tokenizer, template = _read_tokenizer(directory, config_data)
    return SourceModel(
        config=config, tokenizer=tokenizer, chat_template=template, path=directory, shapes=found, load=load
    )


def hf_config_json(config: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """config.json contents for LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": config.max_seq_len,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


class _ShardWriter:
    """Streams tensors into safetensors shards. Data goes to a scratch file as it comes; when a shard is
    full its header (which must precede the data and lists every tensor) is written, then the data copied
    after it, so only one tensor is ever in memory."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.finished: list[tuple[Path, list[str]]] = []  # (temporary shard path, names)
        self.total_bytes = 0
        self._start()

    def _start(self) -> None:
        self.data_path = self.directory / f".shard-{len(self.finished):05d}.data.partial"
        self.data = open(self.data_path, "wb")  # closed in _finish_shard or abort
        self.header: dict[str, dict] = {}
        self.offset = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.header and self.offset + nbytes > self.max_bytes:
            self._finish_shard()
            self._start()
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.data.write(memoryview(flat))
        dtype = _SAFETENSORS_DTYPES[tensor.dtype]
        self.header[key] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [self.offset, self.offset + nbytes],
        }
        self.offset += nbytes
        self.total_bytes += nbytes

    def _finish_shard(self) -> None:
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
        shard = self.directory / f".shard-{len(self.finished):05d}.safetensors.partial"
        with open(shard, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
        self.data_path.unlink()
        self.finished.append((shard, list(self.header)))

    def close(self) -> dict[str, str]:
        """Finish the last shard, give every shard its final name; returns the weight map.

        Weight files of an earlier export in the directory are removed first: a stale index next to a new
        single file (or the reverse) would make readers load the wrong weights."""
        self._finish_shard()
        for stale in [*self.directory.glob("model-*-of-*.safetensors"), self.directory / SINGLE_FILE]:
            stale.unlink(missing_ok=True)
        (self.directory / INDEX_FILE).unlink(missing_ok=True)
        n = len(self.finished)
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self.finished):
            final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            publish(tmp, self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        fsync_dir(self.directory)
        return weight_map

    def abort(self) -> None:
        self.data.close()
        self.data_path.unlink(missing_ok=True)
        for tmp, _ in self.finished:
            tmp.unlink(missing_ok=True)


def write_hf(
    directory: str | Path,
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer: Tokenizer,
    chat_template: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a Hugging Face LlamaForCausalLM directory from dense tensors in sct-edge naming.

    `tensors` is consumed one at a time (a generator keeps peak memory at one tensor); every tensor the
    config implies must come exactly once, with its shape. `dtype` is float32 (exact), float16 or bfloat16.
    Returns the directory.
    """
    directory = Path(directory)
    if dtype not in _SAFETENSORS_DTYPES:
        raise SctError(f"export dtype {dtype} is not supported (float32, float16 or bfloat16)")
    if max_shard_bytes <= 0:
        raise SctError(f"max shard size must be positive, not {max_shard_bytes}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SctError(f"{directory}: cannot create the directory ({error})") from None
    expected = expected_shapes(config)
    seen: set[str] = set()
    writer = _ShardWriter(directory, max_shard_bytes)
    try:
        for name, tensor in tensors:
            if name not in expected:
                raise SctError(f"{directory}: tensor {name} is not part of {config.name} (dense names expected)")
            if name in seen:
                raise SctError(f"{directory}: tensor {name} was given twice")
            if tuple(tensor.shape) != expected[name]:
                raise SctError(
                    f"{directory}: tensor {name} has shape {list(tensor.shape)}, expected {list(expected[name])}"
                )
            seen.add(name)
            writer.add(hf_name(name), tensor.to(dtype))
        missing = [n for n in expected if n not in seen]
        if missing:
            raise SctError(f"{directory}: tensor {missing[0]} was not given ({len(missing)} missing)")
        weight_map = writer.close()
    except BaseException:
        writer.abort()
        raise

    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(hf_config_json(config, tokenizer, dtype), indent=2))
    (directory / "tokenizer.json").write_text(hf_tokenizer_json(tokenizer), encoding="utf-8")
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_seq_len}
    if isinstance(tokenizer, BPETokenizer):
        for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
            if token_id is not None:
                tok_config[key] = tokenizer.tokenizer.id_to_token(token_id)
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
    return directory
