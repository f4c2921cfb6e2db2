"""Write a safetensors file one tensor at a time, so peak memory is one tensor, not the whole file.

``safetensors.torch.save_file`` needs every tensor in memory at once; a 1 GB adapter or a 5 GB
shard would then cost its full size in RSS. The format is simple enough (8-byte header length,
JSON header with offsets, raw little-endian bytes) to write from a known list of shapes and
dtypes, producing each tensor only when its bytes are due.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from gemma4_bridge.errors import BridgeError, ErrorCode
from gemma4_bridge.safetensors_header import read_header_from

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
    "uint16": ("U16", 2),
    "uint32": ("U32", 4),
    "uint64": ("U64", 8),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "complex64": ("C64", 8),
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


@dataclass(frozen=True)
class FileRange:
    """``nbytes`` bytes at ``offset`` of the open file ``fd``, to be written verbatim.

    The kernel copies them into the output (``copy_file_range``, as ``cp`` does): no page of
    them passes through this process, so a verbatim tensor costs what a file copy costs."""

    fd: int
    offset: int
    nbytes: int


# The kernel copies whole page-cache folios only where a copy starts on a multiple of this in both
# files (ext4, Linux 6.18, 763 MB in 32 MB calls: 0.21 s CPU, as `cp`; 0.30-0.33 s with either
# offset 8 bytes, 4 KiB or 16 KiB off a multiple, or both equal but off): write_streaming puts the
# output's data at the source's offsets modulo it, copy_range starts its calls on multiples of it.
COPY_ALIGN = 64 << 10


@dataclass(frozen=True)
class FileRanges:
    """A tensor's bytes as several :class:`FileRange` in order, e.g. a ZeRO-3 parameter's chunk
    on each rank: copied inside the kernel one after the other, handed to the writer as one item."""

    ranges: tuple[FileRange, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranges)


def write_streaming(
    path: Path,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], Any],
    metadata: dict[str, str] | None = None,
    on_written: Callable[[TensorSpec], None] | None = None,
    *,
    data_start: int | None = None,
) -> None:
    """Write ``specs`` to ``path``; ``produce(spec)`` returns the tensor for one spec when needed.

    The produced tensor must match the spec's shape and dtype (checked), so the header written
    first stays true. ``produce`` may instead return the tensor's raw little-endian bytes (a
    buffer of exactly ``spec.nbytes``) or a :class:`FileRange` / :class:`FileRanges` of them, which
    are written as they are on a writer thread: no tensor is built.

    ``data_start``: the file offset, modulo :data:`COPY_ALIGN`, where the tensor data should
    start; when the tensors are file ranges, pass the one that puts them at their source offsets
    modulo :data:`COPY_ALIGN`, so the kernel copies whole folios. The header is padded with spaces
    (as safetensors pads it) to get there; ignored unless a multiple of 8 (dtype alignment).
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
    if data_start is not None and data_start % 8 == 0:
        raw += b" " * ((data_start - 8 - len(raw)) % COPY_ALIGN)
    with path.open("wb", buffering=0) as f:
        _write_all(f, len(raw).to_bytes(8, "little") + raw)
        writer = _BackgroundWriter(f)
        try:
            for spec in specs:
                tensor = produce(spec)
                if isinstance(tensor, (memoryview, FileRange, FileRanges)):
                    if tensor.nbytes != spec.nbytes:
                        raise ValueError(f"{spec.name}: produced {tensor.nbytes} bytes, header promised {spec.nbytes}")
                    writer.put(tensor)
                else:
                    got = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
                    if got != (spec.shape, spec.dtype):
                        raise ValueError(f"{spec.name}: produced {got}, header promised {(spec.shape, spec.dtype)}")
                    # Written here, after what is queued: the tensor may live in a buffer that the next
                    # produce() reuses, and a hand-off per tensor would cost more than it overlaps.
                    writer.drain()
                    if spec.nbytes:
                        _write_all(f, tensor.contiguous().view(-1).view(_u8()).numpy())
                if on_written is not None:
                    on_written(spec)
            writer.drain()
        finally:
            writer.close()


class _BackgroundWriter:
    """Writes buffers to ``f`` in order on one thread, so the next tensor is produced (read and
    checked) while the previous one is written: on a second core the check costs no wall time.

    Only raw buffers and file ranges are queued: a view stays valid while queued (it keeps its
    memory map alive); a range's file must stay open until :meth:`drain`. Adjacent ranges of one
    file are copied as one run of up to ``RUN`` bytes: fewer calls and hand-offs, and where the
    output is not aligned with the source (see :data:`COPY_ALIGN`) the kernel copies a 0.7 MB range
    5x slower per byte than a long one (ext4, 1,154 ranges of a 763 MB adapter: 2.6 s vs 0.6 s).
    An idle writer (at the start) gets a run as soon as ``IDLE_RUN`` bytes are ready, so the copy
    starts after the first tensors are checked, not the first ``RUN`` bytes (aligned, 1 MB runs
    copy as fast as 32 MB ones: 0.197 s vs 0.195 s CPU for 763 MB).
    """

    RUN = 32 << 20
    IDLE_RUN = 1 << 20

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: BaseException | None = None
        self.run: FileRange | None = None  # adjacent ranges not yet queued
        self.queue: queue.Queue[memoryview | FileRange | FileRanges | None] = queue.Queue(maxsize=8)
        self.thread = threading.Thread(target=self._run, name="write_streaming", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                if self.error is None:  # after an error, keep consuming so put() never blocks
                    if isinstance(item, FileRanges):
                        copy_ranges(self.f, item)
                    elif isinstance(item, FileRange):
                        copy_range(self.f, item)
                    else:
                        _write_all(self.f, item)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                self.error = exc
            finally:
                self.queue.task_done()

    def put(self, data: memoryview | FileRange | FileRanges) -> None:
        if self.error is not None:
            raise self.error
        run = self.run
        if isinstance(data, FileRange) and run is not None and run.fd == data.fd and run.offset + run.nbytes == data.offset and run.nbytes < self.RUN:
            self.run = FileRange(run.fd, run.offset, run.nbytes + data.nbytes)
            if not self.queue.unfinished_tasks and self.run.nbytes >= self.IDLE_RUN:
                self._flush_run()  # the writer is idle (at the start): give it what is ready
            return
        self._flush_run()
        if isinstance(data, FileRange):
            self.run = data
        else:
            self.queue.put(data)

    def _flush_run(self) -> None:
        if self.run is not None:
            self.queue.put(self.run)
            self.run = None

    def drain(self) -> None:
        """Wait until everything queued is written; raise a write error here."""
        self._flush_run()
        self.queue.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.run = None  # close() without drain(): an error already stops the write
        self.queue.put(None)
        self.thread.join()


def _write_all(f: Any, data: Any) -> None:
    """Unbuffered write of a whole buffer (a raw file may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view) :]


# copy_file_range is refused across some filesystems and by some; sendfile, then read + write follow.
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM)


def copy_range(f: Any, r: FileRange) -> None:
    """Append ``r`` to ``f`` (at its current position) inside the kernel, with a plain fallback."""
    out, offset, left = f.fileno(), r.offset, r.nbytes
    for copy in (_copy_file_range, _sendfile):
        try:
            while left:
                # First up to the source's next COPY_ALIGN boundary: from there on (the output at
                # the same offset modulo COPY_ALIGN, see write_streaming) whole folios are copied.
                n = copy(r.fd, out, offset, min(left, -offset % COPY_ALIGN or left))
                if n == 0:
                    raise ValueError(f"source file ends before byte {offset + left} (truncated while converting?)")
                offset, left = offset + n, left - n
            return
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
    while left:
        chunk = os.pread(r.fd, min(left, 64 << 20), offset)
        if not chunk:
            raise ValueError(f"source file ends before byte {offset + left} (truncated while converting?)")
        _write_all(f, chunk)
        offset, left = offset + len(chunk), left - len(chunk)


def copy_ranges(f: Any, rs: FileRanges) -> None:
    """Append each range of ``rs`` to ``f`` inside the kernel (:func:`copy_range`), in order."""
    for r in rs.ranges:
        copy_range(f, r)


@contextlib.contextmanager
def map_range(fd: int, offset: int, nbytes: int) -> Iterator[Any]:
    """``nbytes`` at ``offset`` of ``fd`` as a read-only uint8 tensor of a shared map,
    unmapped on exit (its pages leave the resident set): for reading values in place, no copy.

    The file must hold the range (checked: touching a mapped page past its end kills the process
    with SIGBUS; a ValueError instead). Views of the tensor must not outlive the block."""
    import torch

    size = os.fstat(fd).st_size
    if offset + nbytes > size:
        raise ValueError(f"data ends at byte {offset + nbytes} but the file has {size} bytes (truncated?)")
    if nbytes == 0:
        yield torch.empty(0, dtype=torch.uint8)
        return
    lo = offset - offset % mmap.ALLOCATIONGRANULARITY
    # Faulted in, not MAP_POPULATE (as SafetensorsSource's windows): ZeRO-3 recovery of 800 MB,
    # 6 paired runs, was faster in wall time each time and in CPU 5 times of 6.
    m = mmap.mmap(fd, offset + nbytes - lo, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=lo)
    try:
        with warnings.catch_warnings():  # read-only on purpose: the values are only read
            warnings.simplefilter("ignore", UserWarning)
            yield torch.frombuffer(m, dtype=torch.uint8)[offset - lo :]
    finally:
        try:
            m.close()
        except BufferError:  # a view still held elsewhere: unmapped when the last one goes
            pass


def _copy_file_range(src: int, out: int, offset: int, count: int) -> int:
    return os.copy_file_range(src, out, count, offset)


def _sendfile(src: int, out: int, offset: int, count: int) -> int:
    return os.sendfile(out, src, offset, count)


@cache
def _u8() -> Any:
    import torch

    return torch.uint8


class SafetensorsReader:
    """Read single tensors from a safetensors file: :meth:`get` with plain ``pread`` calls, or
    :meth:`mapped` through one bounded memory-mapped window; never a map of the whole file.

    Why not ``safe_open``: its tensors are backed by a memory map of the whole file, and every page
    touched stays in the process's resident set until the map is closed, so streaming a 1 GB file
    ends with 1 GB RSS. Reading into a buffer (or one window) keeps the peak at one tensor.

    The reader keeps the file open and validates the header read through that descriptor (the one
    validator, :func:`~gemma4_bridge.safetensors_header.validate_header`): a ``header`` passed in
    must be that header, so a file replaced (renamed over) since its header was checked is refused
    instead of read with offsets that describe another file.
    """

    WINDOW = 32 << 20  # bytes of the file mapped at a time by :meth:`mapped`

    def __init__(self, path: Path, header: dict[str, Any] | None = None) -> None:
        self.path = path
        self._file: Any = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened first
        self.header = self._open(expected=header)
        self.data_start = 8 + int.from_bytes(self._pread(0, 8), "little")
        ends = [v["data_offsets"][1] for k, v in self.header.items() if k != "__metadata__"]
        self.data_end = self.data_start + max(ends, default=0)
        self._window: tuple[int, int, Any, Any] | None = None  # (file start, file end, mmap, uint8 tensor)

    def _open(self, expected: dict[str, Any] | None) -> dict[str, Any]:
        """Open the file and validate its header; it must equal ``expected`` when given."""
        try:
            f = self.path.open("rb", buffering=0)
        except OSError as exc:
            raise BridgeError(
                f"{self.path}: cannot read ({exc.strerror or exc}).", fix="check that the file exists and is readable", code=ErrorCode.UNREADABLE
            ) from exc
        try:
            header = read_header_from(f, self.path)
        except BaseException:
            f.close()
            raise
        st = os.fstat(f.fileno())
        identity = (st.st_dev, st.st_ino)
        if (expected is not None and header != expected) or self._identity not in (None, identity):
            f.close()
            raise BridgeError(
                f"{self.path}: the file changed while it was being read (its header is not the one checked).",
                fix="do not replace an adapter while it is converted, inspected or loaded; run again",
                code=ErrorCode.UNREADABLE,
            )
        self._file, self._identity = f, identity
        self._closer = weakref.finalize(self, f.close)  # a reader dropped unclosed still closes its file
        return header

    def _fd(self) -> int:
        if self._file is None:  # reopened after close(): must still be the file whose header was checked
            self._open(expected=self.header)
        return self._file.fileno()

    def _pread(self, offset: int, n: int) -> bytes:
        return os.pread(self._fd(), n, offset)

    def specs(self) -> list[TensorSpec]:
        """Tensors in file order."""
        items = sorted(((k, v) for k, v in self.header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in items:
            if info["dtype"] not in CODE_TO_DTYPE:
                raise BridgeError(
                    f"{self.path}: tensor {name} has dtype {info['dtype']}, which gemma4-bridge cannot stream.",
                    fix=f"supported: {', '.join(CODE_TO_DTYPE)}; convert that tensor to one of them first",
                )
        return [TensorSpec(k, tuple(v["shape"]), CODE_TO_DTYPE[v["dtype"]]) for k, v in items]

    def get(self, name: str, scratch: Any = None) -> Any:
        """A new tensor, or a view into ``scratch`` (a large enough uint8 tensor) valid until its next use."""
        import torch

        info = self.header[name]
        start, end = info["data_offsets"]
        dtype = getattr(torch, CODE_TO_DTYPE[info["dtype"]])
        if scratch is not None:
            tensor = scratch[: end - start].view(dtype).view(tuple(info["shape"]))
        else:
            tensor = torch.empty(tuple(info["shape"]), dtype=dtype)
        if end > start:
            buf = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            if len(buf) != end - start:
                raise ValueError(f"{name}: header says {end - start} bytes for shape {info['shape']} {info['dtype']}")
            got = os.preadv(self._fd(), [buf], self.data_start + start)
            if got != end - start:
                raise ValueError(f"{name}: read {got} of {end - start} bytes (file truncated?)")
        return tensor

    def mapped(self, name: str) -> tuple[memoryview, Any] | None:
        """Tensor ``name`` as its raw bytes and a tensor view of them, in a memory map of the file.

        For copying a tensor verbatim: one memcpy (into the output) instead of a read into a buffer
        and a write from it. Only a window of the file is mapped at a time, so the resident set
        stays at one window however large the file; the views are valid until the next call or
        :meth:`close`. None when the bytes are not aligned for their dtype (read with :meth:`get`).
        """
        import torch

        info = self.header[name]
        start, end = (self.data_start + o for o in info["data_offsets"])
        dtype = getattr(torch, CODE_TO_DTYPE[info["dtype"]])
        if start % dtype.itemsize or end - start != math.prod(info["shape"]) * dtype.itemsize or end > self.data_end:
            return None
        if end == start:
            return memoryview(b""), torch.empty(tuple(info["shape"]), dtype=dtype)
        w = self._window
        if w is None or not (w[0] <= start and end <= w[1]):
            self._unmap()
            lo = start - start % mmap.ALLOCATIONGRANULARITY
            hi = max(end, min(lo + self.WINDOW, self.data_end))
            fd = self._fd()
            # Touching a mapped page past the end of the file kills the process (SIGBUS), so a
            # file truncated since its header was checked must fail here, as a clear error.
            size = os.fstat(fd).st_size
            if size < hi:
                raise ValueError(f"{name}: tensor data ends at byte {hi} but the file now has {size} bytes (truncated?)")
            # Not MAP_POPULATE: it maps page by page, while a fault maps a whole large folio of the
            # page cache (Linux 6.18, 763 MB mapped and summed: 0.044 s CPU faulting, 0.071 s populated).
            m = mmap.mmap(fd, hi - lo, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=lo)
            with warnings.catch_warnings():  # read-only on purpose: the tensor is only read
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.frombuffer(m, dtype=torch.uint8)
            w = self._window = (lo, hi, m, tensor)
        lo, _, m, window = w
        raw = memoryview(m)[start - lo : end - lo]
        return raw, window[start - lo : end - lo].view(dtype).view(tuple(info["shape"]))

    def read_many(self, names: Sequence[str]) -> dict[str, Any]:
        """Tensors ``names`` as views of one private (copy-on-write) map of the file span holding
        them, as ``safe_open`` gives them: no copy (a read into fresh memory spent most of its time
        faulting in pages: 760 MB, 0.6 s CPU vs 0.02 s). Pages are faulted in where the caller first
        touches them, a whole page-cache folio per fault, as vLLM's in-tree load does; populating
        the map up front (``MADV_POPULATE_READ``) maps page by page and cost a 760 MB adapter's
        worker load 15 ms more than the faults it saved (1.20x -> 1.04x the in-tree load, idle box).
        The file is never written; writes to a view stay in this process. A name whose bytes are
        not aligned for its dtype is left out (read it with :meth:`get`)."""
        import torch

        spans = {n: tuple(self.data_start + o for o in self.header[n]["data_offsets"]) for n in names}
        if not spans:
            return {}
        lo = min(a for a, _ in spans.values())
        lo -= lo % mmap.ALLOCATIONGRANULARITY
        hi = max(b for _, b in spans.values())
        fd = self._fd()
        size = os.fstat(fd).st_size  # a mapped page past the end would kill the process (SIGBUS)
        if size < hi or hi > self.data_end:
            raise ValueError(f"tensor data ends at byte {hi} but the file has {size} bytes (truncated?)")
        if hi == lo:
            return {n: self.get(n) for n in spans}
        m = mmap.mmap(fd, hi - lo, flags=mmap.MAP_PRIVATE, offset=lo)  # pages copied only where the caller writes
        whole = torch.frombuffer(m, dtype=torch.uint8)  # keeps the map alive as long as any view
        out = {}
        for name, (a, b) in spans.items():
            info = self.header[name]
            dtype = getattr(torch, CODE_TO_DTYPE[info["dtype"]])
            if (a - lo) % dtype.itemsize or b - a != math.prod(info["shape"]) * dtype.itemsize:
                continue
            out[name] = whole[a - lo : b - lo].view(dtype).view(tuple(info["shape"]))
        return out

    def file_range(self, name: str) -> FileRange:
        """Tensor ``name``'s bytes as a range of the file, for :func:`write_streaming` to copy
        in the kernel; the file stays open until :meth:`close`."""
        start, end = (self.data_start + o for o in self.header[name]["data_offsets"])
        return FileRange(self._fd(), start, end - start)

    def close(self) -> None:
        """Unmap the current window (its pages leave the resident set) and close the file; a later
        read reopens it (and checks it is still the same file)."""
        self._unmap()
        if self._file is not None:
            self._closer()
            self._file = None

    def _unmap(self) -> None:
        if self._window is not None:
            m = self._window[2]
            self._window = None  # drops the window tensor, which holds the map's buffer
            try:
                m.close()
            except BufferError:  # a caller still holds a view: unmapped when the last view goes
                pass
