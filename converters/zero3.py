"""Recover real LoRA values from a DeepSpeed ZeRO-3 checkpoint, without unpickling anything unsafe.

Under ZeRO-3 each of the N ranks owns ``ceil(numel / N)`` elements of every trainable parameter,
laid out in the order of ``param_shapes`` in its fp32 master copy (``fp32_flat_groups`` in
``*_optim_states.pt``; a rank's groups are read as one flat vector). A parameter is the
concatenation of its N chunks, trimmed to ``numel`` and reshaped. The files are pickles: they are
read with ``torch.load(weights_only=True)`` and an allow-list of inert stand-ins for the few
DeepSpeed classes they name, onto the meta device: no tensor data is read, each flat group's
storage only reports its byte offset in the (uncompressed) zip file. A parameter's values are
then N byte ranges of the rank files: :meth:`Zero3Checkpoint.file_ranges` hands them to the writer
to copy inside the kernel (``copy_file_range``, as ``cp`` does; no byte passes through this
process) while :meth:`Zero3Checkpoint.nonfinite` checks them on read-only maps, one window at a
time; :meth:`Zero3Checkpoint.recover` reads one tensor with ``pread`` (for a cast, merge, export).
No Adam moment is read, and memory stays at one tensor or one window.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from gemma4_bridge.adapter_io import safe_torch_load
from gemma4_bridge.errors import BridgeError

from .safetensors_stream import DTYPES, FileRange, FileRanges, map_range

# DeepSpeed ZeRO-3's on-disk format: what this reader expects and what the synthetic writer
# (gemma4_bridge.testing.zero3_job.write_synthetic_zero3_checkpoint) writes.
LATEST_FILE = "latest"  # holds the tag (step directory name) of the last save
STEP_DIR = "global_step{step}"
RANK_FILE = "zero_pp_rank_{rank}_mp_rank_{mp:02d}_{kind}_states.pt"  # kind: "model" or "optim"
OPTIMIZER_STATE = "optimizer_state_dict"  # optim file: the ZeRO optimizer's state
FLAT_GROUPS = "fp32_flat_groups"  # ... its per-group fp32 partitions of this rank
PARTITION_COUNT = "partition_count"
ZERO_STAGE = "zero_stage"
PARAM_SHAPES = "param_shapes"  # model file: per group, {name: shape} in partition order
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")
_STEP_DIR = re.compile("^" + STEP_DIR.replace("{step}", r"(\d+)") + "$")


@cache
def deepspeed_globals() -> tuple[Any, ...]:
    """Allow-list for DeepSpeed checkpoints: inert stand-ins for the classes the pickles name.

    The stand-ins carry the DeepSpeed qualified names so the weights-only unpickler accepts them,
    but they are plain records: unpickling never imports or runs DeepSpeed code. ``torch.Size``
    (``param_shapes``) and plain containers are already allowed.
    """
    import enum

    def record(module: str, name: str) -> type:
        cls = type(name, (), {"__setstate__": lambda self, state: self.__dict__.update(state if isinstance(state, dict) else {"state": state})})
        cls.__module__ = module
        return cls

    class ZeroStageEnum(int, enum.Enum):  # deepspeed.runtime.zero.config.ZeroStageEnum
        disabled = 0
        optimizer_states = 1
        gradients = 2
        weights = 3

    ZeroStageEnum.__module__ = "deepspeed.runtime.zero.config"
    ZeroStageEnum.__qualname__ = "ZeroStageEnum"
    return (
        ZeroStageEnum,
        record("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        record("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        record("deepspeed.utils.tensor_fragment", "fragment_address"),
    )


def locate_checkpoint(adapter_dir: Path | None, explicit: str | os.PathLike[str] | None) -> Path:
    """The ``global_stepN`` directory to read: from ``explicit``, else next to the adapter.

    Looks in the given directory (``latest`` tag file, or ``global_step*/``, or rank files
    directly), then in the adapter directory and its parent (HF Trainer saves the DeepSpeed
    checkpoint inside ``checkpoint-N/`` beside the adapter files).
    """
    if explicit is not None:
        root = Path(explicit)
        if not root.is_dir():
            raise BridgeError(f"{root}: --zero3-checkpoint is not a directory.", fix="pass the DeepSpeed checkpoint directory (with 'latest' and global_stepN/)")
        found = _tag_dir(root)
        if found is None:
            raise BridgeError(
                f"{root}: no DeepSpeed ZeRO checkpoint here (no 'latest' file, no global_step*/, no *_optim_states.pt).",
                fix="pass the directory that engine.save_checkpoint() wrote",
            )
        return found
    looked: list[Path] = []
    for root in [adapter_dir, adapter_dir.parent] if adapter_dir is not None else []:
        looked.append(root)
        found = _tag_dir(root)
        if found is not None:
            return found
    where = ", ".join(str(p) for p in looked) or "nowhere (in-memory adapter)"
    raise BridgeError(
        f"no DeepSpeed checkpoint found (looked for 'latest', global_step*/ and *_optim_states.pt in {where})",
        fix="pass --zero3-checkpoint DIR (the directory engine.save_checkpoint() wrote), or save the adapter "
        "with stage3_gather_16bit_weights_on_model_save=true",
    )


def _tag_dir(root: Path) -> Path | None:
    if any(_RANK_FILE.search(p.name) for p in root.glob("*_optim_states.pt")):
        return root
    latest = root / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag).is_dir():
            return root / tag
    steps = sorted((int(m.group(1)), p) for p in root.glob("global_step*") if p.is_dir() and (m := _STEP_DIR.match(p.name)))
    return steps[-1][1] if steps else None


@dataclass(frozen=True)
class FlatGroup:
    """One fp32 flat group of a rank: ``numel`` elements at byte ``offset`` of the rank's file."""

    offset: int
    numel: int


@dataclass
class Zero3Checkpoint:
    """An opened ZeRO-3 checkpoint: parameter order and shapes, and where each rank's fp32 partition lies."""

    tag_dir: Path
    world_size: int
    param_shapes: dict[str, tuple[int, ...]]  # trainable params, in partition order
    offsets: dict[str, int]  # per-rank element offset of each param's chunk
    partitions: list[tuple[Path, list[FlatGroup]]]  # per rank: its optim file and fp32 flat groups in it
    ds_version: str | None = None
    dtype: str = "float32"  # of the flat groups (DeepSpeed's master weights)
    _fds: dict[int, int] = field(default_factory=dict, repr=False)  # rank -> open file descriptor
    # rank -> (st_dev, st_ino, st_size, st_mtime_ns) of its optim file when its offsets were read
    _identities: dict[int, tuple[int, int, int, int]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, tag_dir: Path) -> Zero3Checkpoint:
        model_files = _rank_files(tag_dir, "model")
        optim_files = _rank_files(tag_dir, "optim")
        if not optim_files or not model_files:
            raise BridgeError(
                f"{tag_dir}: missing *_model_states.pt or *_optim_states.pt.",
                fix="the DeepSpeed checkpoint is incomplete; copy the whole global_stepN directory",
            )
        model_states = _load(model_files[0], map_location="cpu")
        shapes_groups = model_states.get(PARAM_SHAPES) if isinstance(model_states, dict) else None
        if not isinstance(shapes_groups, list):
            raise BridgeError(f"{model_files[0]}: no 'param_shapes'; not a ZeRO-3 model-states file.", fix="pass a DeepSpeed ZeRO-3 checkpoint")
        param_shapes = {name: tuple(int(d) for d in shape) for group in shapes_groups for name, shape in group.items()}
        partitions: list[tuple[Path, list[FlatGroup]]] = []
        world_size = len(optim_files)
        dtypes = set()
        identities = {}
        for rank, path in enumerate(optim_files):
            st = path.stat()
            identities[rank] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            state = _load(path, map_location="meta")  # structure and storage offsets only
            osd = state.get(OPTIMIZER_STATE) if isinstance(state, dict) else None
            if not isinstance(osd, dict) or FLAT_GROUPS not in osd:
                raise BridgeError(f"{path}: no fp32_flat_groups; not a ZeRO-3 optimizer-states file.", fix="pass a DeepSpeed ZeRO-3 checkpoint")
            stage = int(osd.get(ZERO_STAGE, 0))
            count = osd.get(PARTITION_COUNT)
            count = max(count) if isinstance(count, list) else count
            if stage != 3 or (count is not None and int(count) != world_size):
                raise BridgeError(
                    f"{path}: zero_stage={stage}, partition_count={count}, but {world_size} rank file(s) found.",
                    fix="recovery needs a complete ZeRO-3 checkpoint: all ranks' *_optim_states.pt from one step",
                )
            _require_plain_storage(path)
            size = st.st_size
            groups = []
            for g in osd[FLAT_GROUPS]:
                base = getattr(g.untyped_storage(), "_checkpoint_offset", None)
                if base is None or not g.is_contiguous():
                    raise BridgeError(f"{path}: an fp32 flat group is not a plain stored tensor.", fix="pass a DeepSpeed ZeRO-3 checkpoint")
                group = FlatGroup(int(base) + g.storage_offset() * g.element_size(), g.numel())
                if group.offset + group.numel * g.element_size() > size:
                    raise BridgeError(f"{path}: file ends inside an fp32 flat group (truncated?).", fix="copy the checkpoint again")
                groups.append(group)
                dtypes.add(str(g.dtype).removeprefix("torch."))
            partitions.append((path, groups))
            del state, osd
        if len(dtypes) > 1:
            raise BridgeError(f"{tag_dir}: fp32 flat groups of mixed dtypes {sorted(dtypes)}.", fix="pass a DeepSpeed ZeRO-3 checkpoint")
        offsets, offset = {}, 0
        for name, shape in param_shapes.items():
            offsets[name] = offset
            offset += math.ceil(math.prod(shape) / world_size)
        for path, groups in partitions:
            have = sum(g.numel for g in groups)
            if have < offset:
                raise BridgeError(
                    f"{path}: holds {have} fp32 elements but param_shapes needs {offset}.",
                    fix="the checkpoint's rank files come from different runs; copy the whole global_stepN directory again",
                )
        ckpt = cls(tag_dir, world_size, param_shapes, offsets, partitions, model_states.get("ds_version"), dtypes.pop() if dtypes else "float32")
        ckpt._identities = identities
        return ckpt

    def recover(self, name: str, scratch: Any = None) -> Any:
        """One parameter's fp32 values, gathered from every rank's partition.

        A new tensor, or a view into ``scratch`` (a large enough uint8 tensor) valid until its next use.
        """
        import torch

        shape = self.param_shapes[name]
        numel = math.prod(shape)
        chunk = math.ceil(numel / self.world_size)
        dtype = getattr(torch, self.dtype)
        nbytes = chunk * self.world_size * dtype.itemsize
        if scratch is not None and scratch.numel() >= nbytes:
            out = scratch[:nbytes].view(dtype)
        else:
            out = torch.empty(chunk * self.world_size, dtype=dtype)
        buf = memoryview(out.view(torch.uint8).numpy())
        step = chunk * dtype.itemsize
        for rank in range(self.world_size):
            self._read(rank, self.offsets[name], chunk, buf[rank * step : (rank + 1) * step])
        return out[:numel].view(shape)

    def _read(self, rank: int, start: int, length: int, dest: memoryview) -> None:
        """Elements [start, start+length) of a rank's groups read as one vector into ``dest``."""
        pos = 0
        for offset, nbytes in self._spans(rank, start, length):
            part = dest[pos : pos + nbytes]
            if os.preadv(self._fd(rank), [part], offset) != nbytes:
                raise BridgeError(f"{self.partitions[rank][0]}: file ends inside an fp32 flat group (truncated?).", fix="copy the checkpoint again")
            pos += nbytes

    def _spans(self, rank: int, start: int, length: int) -> list[tuple[int, int]]:
        """(file offset, bytes) of elements [start, start+length) of a rank's groups read as one
        vector: one span, two where the range straddles groups."""
        size = DTYPES[self.dtype][1]
        spans, pos = [], 0
        for g in self.partitions[rank][1]:
            lo, hi = max(start, pos), min(start + length, pos + g.numel)
            if lo < hi:
                spans.append((g.offset + (lo - pos) * size, (hi - lo) * size))
            pos += g.numel
            if pos >= start + length:
                break
        return spans

    def _chunks(self, name: str) -> list[tuple[int, int, int]]:
        """(rank, file offset, bytes) of parameter ``name``'s values in rank order: ``ceil(numel / N)``
        elements per rank, the padding after the last element (and ranks holding only padding) left out."""
        numel = math.prod(self.param_shapes[name])
        chunk = math.ceil(numel / self.world_size)
        out = []
        for rank in range(self.world_size):
            n = min(chunk, numel - rank * chunk)
            if n <= 0:
                break
            out += [(rank, offset, nbytes) for offset, nbytes in self._spans(rank, self.offsets[name], n)]
        return out

    def _fd(self, rank: int) -> int:
        """The rank's optim file, opened once; it must still be the file whose offsets were read
        (a file replaced since would be copied from offsets that describe another file)."""
        fd = self._fds.get(rank)
        if fd is None:
            path = self.partitions[rank][0]
            fd = os.open(path, os.O_RDONLY)
            st = os.fstat(fd)
            if self._identities.get(rank, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)) != (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
                os.close(fd)
                raise BridgeError(
                    f"{path}: the file changed while it was being read (replaced or rewritten since its structure was read).",
                    fix="do not modify a DeepSpeed checkpoint while it is converted; run again",
                )
            self._fds[rank] = fd
        return fd

    def open_files(self) -> None:
        """Open every rank file now, so threads reading values (:meth:`nonfinite`) and the writer
        copying :meth:`file_ranges` share the descriptors without racing to open them."""
        for rank in range(self.world_size):
            self._fd(rank)

    def file_ranges(self, name: str) -> FileRanges:
        """Parameter ``name``'s values (the checkpoint's dtype) as ranges of the rank files, for
        :func:`~.safetensors_stream.write_streaming` to copy inside the kernel; the files stay open
        until :meth:`close`. Not checked: see :meth:`nonfinite`."""
        return FileRanges(tuple(FileRange(self._fd(rank), offset, nbytes) for rank, offset, nbytes in self._chunks(name)))

    WINDOW = 32 << 20  # bytes mapped at a time by :meth:`nonfinite`

    def nonfinite(self, names: Sequence[str], stop: threading.Event | None = None) -> tuple[str, int] | None:
        """The first of parameters ``names`` holding NaN/Inf and how many; None when all are finite
        (or ``stop`` was set: the caller gave up). Thread-safe once every rank file is open.

        Reads the values in place, on read-only maps of the rank files one window at a time (the
        resident set grows by a window, not by the 0.7 GB read): the byte spans holding ``names``
        are summed window by window (a sum is finite iff every value is; NaN/Inf propagate). Only a
        non-finite sum (or an overflowing sum of huge finite values) costs the exact check per
        parameter, which also leaves out what is not in ``names`` (padding, other parameters).
        """
        import torch

        dtype = getattr(torch, self.dtype)
        for rank, lo, hi in self._windows(names):
            if stop is not None and stop.is_set():
                return None
            with self._mapped(rank, lo, hi - lo) as raw:
                finite = math.isfinite(raw.view(dtype).sum().item())
                del raw
            if not finite:
                break
        else:
            return None
        for name in names:
            bad = 0
            for rank, offset, nbytes in self._chunks(name):
                with self._mapped(rank, offset, nbytes) as raw:
                    bad += int((~torch.isfinite(raw.view(dtype))).sum())
                    del raw
            if bad:
                return name, bad
        return None

    def _windows(self, names: Sequence[str]) -> Iterator[tuple[int, int, int]]:
        """(rank, start, end) byte ranges of the rank files holding ``names``' values: adjacent
        chunks merged (a rank holds consecutive parameters back to back), cut into windows."""
        merged: dict[int, list[list[int]]] = {}  # rank -> [start, end] of merged chunks
        for name in names:
            for rank, offset, nbytes in self._chunks(name):
                spans = merged.setdefault(rank, [])
                if spans and spans[-1][1] == offset:
                    spans[-1][1] += nbytes
                else:
                    spans.append([offset, offset + nbytes])
        for rank, spans in merged.items():
            for start, end in spans:
                for lo in range(start, end, self.WINDOW):
                    yield rank, lo, min(end, lo + self.WINDOW)

    @contextlib.contextmanager
    def _mapped(self, rank: int, offset: int, nbytes: int) -> Iterator[Any]:
        """Bytes [offset, offset+nbytes) of a rank file as a read-only mapped uint8 tensor."""
        path = self.partitions[rank][0]
        if offset % DTYPES[self.dtype][1]:
            raise BridgeError(f"{path}: an fp32 flat group is not aligned for its dtype.", fix="re-save the checkpoint with torch.save")
        mapping = map_range(self._fd(rank), offset, nbytes)
        try:
            raw = mapping.__enter__()
        except (OSError, ValueError) as exc:
            raise BridgeError(f"{path}: cannot read an fp32 flat group ({exc}).", fix="copy the checkpoint again") from exc
        try:
            yield raw
        finally:
            del raw
            mapping.__exit__(None, None, None)

    def close(self) -> None:
        """Close the rank files (reopened on the next :meth:`recover`)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        self.close()


def _require_plain_storage(path: Path) -> None:
    """Flat groups are read as raw bytes at their zip offsets: they must be stored uncompressed, in this machine's byte order."""
    with zipfile.ZipFile(path) as z:
        order = next((n for n in z.namelist() if n.endswith("/byteorder")), None)
        stored = all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist() if "/data/" in i.filename)
        if (order is not None and z.read(order).strip().decode() != sys.byteorder) or not stored:
            raise BridgeError(f"{path}: tensor data compressed or in another byte order.", fix="re-save the checkpoint with torch.save on a machine of this byte order")


def _rank_files(tag_dir: Path, kind: str) -> list[Path]:
    files: dict[int, Path] = {}
    for path in tag_dir.glob(f"*_{kind}_states.pt"):
        m = _RANK_FILE.search(path.name)
        if not m:
            continue
        if int(m.group(2)) != 0:
            raise BridgeError(
                f"{path}: model-parallel rank {int(m.group(2))}; only data-parallel ZeRO-3 checkpoints are supported.",
                fix="consolidate tensor-parallel shards with DeepSpeed's tools first",
            )
        files[int(m.group(1))] = path
    ranks = sorted(files)
    if ranks and ranks != list(range(len(ranks))):
        raise BridgeError(
            f"{tag_dir}: {kind} states for ranks {ranks}; some ranks are missing.",
            fix="copy every zero_pp_rank_*_mp_rank_00_*_states.pt file of the checkpoint",
        )
    return [files[r] for r in ranks]


def _load(path: Path, *, map_location: str) -> Any:
    return safe_torch_load(path, extra_globals=deepspeed_globals(), map_location=map_location)
