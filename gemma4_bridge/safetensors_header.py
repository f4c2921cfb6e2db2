"""Read a safetensors header and validate it exactly as strictly as the safetensors library does.

Every reader of safetensors files here (base model headers, adapters, the ``pread``/mmap reader of
the converters, the serving plugins' checks, ``inspect``) goes through :func:`validate_header`, so
a header that ``safetensors.safe_open`` refuses is refused everywhere, with the file, the tensor and
the fix named. Why it matters: our own readers turn ``data_offsets`` into file positions; overlapping,
reversed, out-of-range or mis-sized offsets would otherwise be read as tensor values (header bytes
served as weights) instead of failing.

The rules are those of safetensors' Rust ``SafeTensors::read_metadata`` / ``Metadata::validate``
(huggingface/safetensors, ``safetensors/src/tensor.rs``): header length at most 100,000,000 bytes
and inside the file; UTF-8 JSON object; ``__metadata__`` absent, null or a string->string map; every
other entry an object with a known ``dtype``, a ``shape`` list of non-negative integers and two
non-negative integer ``data_offsets``; sorted by offsets, the tensors start at byte 0, follow each
other without gap or overlap, each holds exactly ``numel * bits / 8`` bytes, and the last one ends
exactly at the end of the file. Unknown extra fields of an entry are ignored, as safetensors does.
One rule is stricter: an entry must be a JSON object (serde would also read ``[dtype, shape,
data_offsets]`` as an entry; no writer produces that, and the format defines entries as objects).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from gemma4_bridge.errors import BridgeError, ErrorCode

MAX_HEADER_BYTES = 100_000_000  # safetensors' MAX_HEADER_SIZE
METADATA_KEY = "__metadata__"
_USIZE_MAX = 2**64 - 1
# Every dtype safetensors knows, with its size in bits (safetensors' Dtype::bitsize).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
CORRUPT_FIX = (
    "the file is damaged or was written by a tool that breaks the safetensors format (the safetensors "
    "library refuses it too); copy it again from its source, or re-save the tensors with "
    "safetensors.torch.save_file / PEFT's save_pretrained"
)


class _Obj(dict):  # type: ignore[type-arg]
    """A JSON object that remembers keys it saw twice (safetensors refuses a duplicate field)."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
    return obj


def _may_repeat_a_field(raw: bytes, header: Any) -> bool:
    """False only if no entry can name a field twice: each of ``"dtype"``, ``"shape"`` and
    ``"data_offsets"`` occurs in the raw text exactly once per entry, and no ``\\u`` escape could
    spell one differently. Counting bytes is ~30x cheaper than a Python hook per JSON object."""
    if not isinstance(header, dict) or b"\\u" in raw:
        return True
    entries = len(header) - (METADATA_KEY in header)
    return any(raw.count(b'"%s"' % field) != entries for field in (b"dtype", b"shape", b"data_offsets"))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The validated JSON header of one safetensors file: tensor name -> dtype, shape, data_offsets
    (plus ``__metadata__``). Raises :class:`BridgeError` for anything ``safe_open`` would refuse."""
    try:
        with Path(path).open("rb") as f:
            return read_header_from(f, Path(path))
    except OSError as exc:
        raise BridgeError(
            f"{path}: cannot read ({exc.strerror or exc}).", fix="check that the file exists and is readable", code=ErrorCode.UNREADABLE
        ) from exc


def read_header_from(f: BinaryIO, path: Path) -> dict[str, Any]:
    """Like :func:`read_safetensors_header`, from an open file (position ignored)."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    raw_len = _read(f, 8)
    if len(raw_len) != 8:
        raise _corrupt(path, f"the file has {size} bytes, fewer than the 8-byte header length (truncated)")
    (n,) = struct.unpack("<Q", raw_len)
    if n > MAX_HEADER_BYTES:
        raise _corrupt(path, f"header length {n} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > size:
        raise _corrupt(path, f"the header claims {n} bytes but the file has {size} (truncated)")
    raw = _read(f, n)
    if len(raw) != n:
        raise _corrupt(path, f"the header claims {n} bytes but only {len(raw)} could be read (truncated)")
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, parse_constant=_no_constant)
        if _may_repeat_a_field(raw, header):  # the exact (3x slower) parse, only when needed
            header = json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _corrupt(path, f"the header is not valid UTF-8 JSON ({str(exc)[:200]})") from exc
    return validate_header(header, path, data_len=size - 8 - n)


def _read(f: BinaryIO, n: int) -> bytes:
    """``n`` bytes from ``f`` (fewer only at the end of the file): an unbuffered read may return less."""
    chunks, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def validate_header(header: Any, path: Path, *, data_len: int) -> dict[str, Any]:
    """Check a parsed header against a data section of ``data_len`` bytes; return it unchanged.

    Cheap (no data read): O(n log n) in the number of tensors.
    """
    if not isinstance(header, dict):
        raise _corrupt(path, f"the header is a JSON {_json_kind(header)}, not an object of tensor entries")
    metadata = header.get(METADATA_KEY)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise _corrupt(path, f"{METADATA_KEY} is not a map of strings to strings ({_short(metadata)})")
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == METADATA_KEY:
            continue
        _check_name(name, path)
        begin, end = _check_entry(name, info, path)
        spans.append((begin, end, name))
    spans.sort()
    position, previous = 0, None
    for begin, end, name in spans:
        if begin != position:
            if previous is None:
                what = f"its data starts at byte {begin}, but the first tensor's data must start at byte 0"
            elif begin < position:
                what = f"data_offsets [{begin}, {end}] overlap tensor {previous!r}, which ends at byte {position}"
            else:
                what = f"data_offsets [{begin}, {end}] leave bytes {position}-{begin} after tensor {previous!r} unused"
            raise _corrupt(path, what, name)
        info = header[name]
        numel = math.prod(info["shape"])
        bits = numel * DTYPE_BITS[info["dtype"]]
        if bits % 8:
            raise _corrupt(path, f"shape {info['shape']} of {info['dtype']} is not a whole number of bytes", name)
        if end - begin != bits // 8:
            raise _corrupt(
                path,
                f"data_offsets [{begin}, {end}] hold {end - begin} bytes but shape {info['shape']} of "
                f"{info['dtype']} needs {bits // 8}",
                name,
            )
        position, previous = end, name
    if position > data_len:
        raise _corrupt(
            path, f"its data ends at byte {position} of the data section, but the file has only {data_len} (truncated)", previous
        )
    if position < data_len:
        raise _corrupt(path, f"the file has {data_len - position} bytes after the last tensor's data that no tensor covers")
    return header


def _check_name(name: str, path: Path) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _corrupt(path, f"tensor name {name!r} is not valid UTF-8") from exc


def _check_entry(name: str, info: Any, path: Path) -> tuple[int, int]:
    if not isinstance(info, dict):
        raise _corrupt(path, f"the entry is a JSON {_json_kind(info)}, not an object with dtype, shape and data_offsets", name)
    duplicated = getattr(info, "duplicates", ())
    if duplicated:
        raise _corrupt(path, f"field {duplicated[0]!r} appears twice", name)
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise _corrupt(path, f"no {field!r}", name)
    if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPE_BITS:
        raise _corrupt(path, f"unknown dtype {_short(info['dtype'])} (safetensors knows {', '.join(DTYPE_BITS)})", name)
    shape = info["shape"]
    # usize checks, inlined (once per tensor of every header read); `type(x) is int` refuses bool, as safetensors does
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= _USIZE_MAX for d in shape):
        raise _corrupt(path, f"shape {_short(shape)} is not a list of non-negative integers", name)
    offsets = info["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and 0 <= o <= _USIZE_MAX for o in offsets):
        raise _corrupt(path, f"data_offsets {_short(offsets)} are not two non-negative integers [begin, end]", name)
    begin, end = offsets
    if begin > end:
        raise _corrupt(path, f"data_offsets [{begin}, {end}] are reversed (begin after end)", name)
    return begin, end


def _json_kind(x: Any) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(x), type(x).__name__)


def _short(x: Any) -> str:
    text = json.dumps(x) if not isinstance(x, str) else repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _corrupt(path: Path, what: str, tensor: str | None = None) -> BridgeError:
    where = f"tensor {tensor}: " if tensor is not None else ""
    return BridgeError(f"{path}: corrupt safetensors header: {where}{what}.", fix=CORRUPT_FIX, code=ErrorCode.UNREADABLE)
