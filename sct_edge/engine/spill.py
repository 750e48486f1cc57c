"""Boundary activations on disk (`activations = "spill"`): written in forward, read back in backward.

For long sequences the boundary activations (every block's input, for every micro-batch) are what does not
fit in RAM. With spill, forward writes block i's input to a file as soon as block i has run, and backward
reads it back just before recomputing block i, so only the activations of the block being computed are in
RAM. The files live in a private directory beside the store (never inside it: the store's directory holds
exactly its manifest and shards) and are removed when the engine is closed or the process exits.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from sct_edge.errors import SctError


class ActivationSpill:
    """Lists of tensors saved under a block index; counts the bytes moved."""

    def __init__(self, beside: Path) -> None:
        try:
            self._directory = tempfile.TemporaryDirectory(prefix=f".{beside.name}.spill-", dir=beside.parent)
        except OSError as error:
            raise SctError(f"activation spill beside {beside}: {(error.strerror or str(error)).lower()}") from None
        self.path = Path(self._directory.name)
        self.bytes_read = 0
        self.bytes_written = 0

    def _file(self, index: int) -> Path:
        return self.path / f"{index}.safetensors"

    def put(self, index: int, tensors: list[Tensor]) -> None:
        path = self._file(index)
        data = save({str(j): t.contiguous() for j, t in enumerate(tensors)})
        try:
            path.write_bytes(data)
        except OSError as error:
            path.unlink(missing_ok=True)
            raise SctError(f"activation spill {path}: {(error.strerror or str(error)).lower()}") from None
        self.bytes_written += len(data)

    def get(self, index: int) -> list[Tensor]:
        path = self._file(index)
        try:
            data = path.read_bytes()
            tensors = load(data)
        except OSError as error:
            raise SctError(f"activation spill {path}: {(error.strerror or str(error)).lower()}") from None
        except SafetensorError as error:
            raise SctError(f"activation spill {path}: damaged, cannot be read back ({error})") from None
        self.bytes_read += len(data)
        return [tensors[str(j)] for j in range(len(tensors))]

    def close(self) -> None:
        self._directory.cleanup()
