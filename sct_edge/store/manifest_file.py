"""Reading a store's manifest.json: the one reader, with the format and version check and the file-name check.

Every file a manifest names must be a file of the store directory: shard versions by their fixed name
pattern, the tokenizer by a plain file name, so a store shared by someone else cannot point sct-edge at a
file elsewhere (`../../x` or an absolute path). This module needs neither torch nor the shard layout, so
`tools/memcalc` reads a store's model config with the standard library alone; `Store.open` builds the typed
manifest on top and checks the layout against the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from sct_edge import __version__ as SCT_EDGE_VERSION
from sct_edge.errors import SctError
from sct_edge.model.config import ModelConfig
from sct_edge.store.shard_names import parse_shard_file

FORMAT = "sct-edge-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def read_manifest_bytes(path: Path) -> bytes:
    """The raw manifest of store directory `path` (SctError when there is no store there)."""
    if not path.is_dir():
        raise SctError(f"store {path} does not exist" if not path.exists() else f"store {path} is not a directory")
    try:
        return (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        if any(parse_shard_file(p.name) for p in path.iterdir()):
            raise SctError(
                f"{path} has shard files but no {MANIFEST}: a store creation was interrupted; "
                f"delete the directory and create the store again"
            ) from None
        raise SctError(f"{path} is not an sct-edge store (no {MANIFEST})") from None
    except OSError as error:
        raise SctError(f"{path / MANIFEST}: cannot read: {error.strerror}") from None


def parse_manifest(raw: bytes, label: str) -> dict:
    """The manifest's JSON data, once its format, version and every file name it gives are checked."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SctError(f"{label}: not valid JSON (the manifest is corrupt)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SctError(f'{label}: not an sct-edge store manifest (no "format": "{FORMAT}")')
    version = data.get("format_version")
    if not isinstance(version, int):
        raise SctError(f"{label}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise SctError(
            f"{label}: store format version {version} was written by a newer sct-edge "
            f"({data.get('written_by', 'unknown')}); this sct-edge {SCT_EDGE_VERSION} reads format "
            f"version {FORMAT_VERSION}: upgrade sct-edge"
        )
    if version < FORMAT_VERSION:
        raise SctError(
            f"{label}: store format version {version} predates format version 1, the first this "
            f"sct-edge reads; no conversion exists: re-create or re-import the store"
        )
    _check_file_names(data, label)
    return data


def read_manifest(path: Path) -> dict:
    """The checked JSON data of the manifest of store directory `path` (the store's other files are not read)."""
    return parse_manifest(read_manifest_bytes(path), str(path / MANIFEST))


def manifest_config(data: dict, label: str) -> ModelConfig:
    """The model config a manifest's data records, validated."""
    try:
        config = ModelConfig.from_dict(data["config"])
    except KeyError as error:
        raise SctError(f"{label}: field {error} is missing") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise SctError(f"{label}: malformed field ({error})") from None
    try:
        config.validate()
    except SctError as error:
        raise SctError(f"{label}: {error}") from None
    return config


def _check_file_names(data: dict, label: str) -> None:
    # Entries too malformed to hold a name are left to the typed parse, which says what is wrong with them.
    shards = data.get("shards")
    for name, entry in shards.items() if isinstance(shards, dict) else ():
        file = entry.get("file") if isinstance(entry, dict) else None
        if file is not None and parse_shard_file(str(file)) is None:
            raise SctError(f"{label}: shard {name} names an invalid file '{file}'")
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict) and "file" in tokenizer:
        file = tokenizer["file"]
        if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file or "\\" in file:
            raise SctError(f"{label}: the tokenizer entry names an invalid file {file!r} (not a file of the store)")
