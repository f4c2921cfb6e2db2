"""Write a safetensors file one tensor at a time, so peak memory is one tensor, not the whole file.

``safetensors.torch.save_file`` needs every tensor in memory at once; a 1 GB adapter or a 5 GB
shard would then cost its full size in RSS. The format is simple enough (8-byte header length,
JSON header with offsets, raw little-endian bytes) to write from a known list of shapes and
dtypes, producing each tensor only when its bytes are due.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# torch dtype name -> (safetensors code, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
CODE_TO_DTYPE: dict[str, str] = {code: name for name, (code, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What will be written under ``name``: known before any data is read."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def write_streaming(
    path: Path,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], Any],
    metadata: dict[str, str] | None = None,
    on_written: Callable[[TensorSpec], None] | None = None,
) -> None:
    """Write ``specs`` to ``path``; ``produce(spec)`` returns the tensor for one spec when needed.

    The produced tensor must match the spec's shape and dtype (checked), so the header written
    first stays true.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPES[spec.dtype][0], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for spec in specs:
            tensor = produce(spec)
            got = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            if got != (spec.shape, spec.dtype):
                raise ValueError(f"{spec.name}: produced {got}, header promised {(spec.shape, spec.dtype)}")
            if spec.nbytes:
                f.write(memoryview(tensor.contiguous().view(-1).view(_u8()).numpy()))
            if on_written is not None:
                on_written(spec)


def _u8() -> Any:
    import torch

    return torch.uint8
