"""Recover real LoRA values from a DeepSpeed ZeRO-3 checkpoint, without unpickling anything unsafe.

Under ZeRO-3 each of the N ranks owns ``ceil(numel / N)`` elements of every trainable parameter,
laid out in the order of ``param_shapes`` in its fp32 master copy (``fp32_flat_groups`` in
``*_optim_states.pt``; a rank's groups are read as one flat vector). A parameter is the
concatenation of its N chunks, trimmed to ``numel`` and reshaped. The files are pickles: they are
read with ``torch.load(weights_only=True)`` and an allow-list of inert stand-ins for the few
DeepSpeed classes they name, and memory-mapped, so recovering one tensor touches only its bytes.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from gemma4_bridge.adapter_io import safe_torch_load
from gemma4_bridge.errors import BridgeError

_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")
_STEP_DIR = re.compile(r"^global_step(\d+)$")


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
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag).is_dir():
            return root / tag
    steps = sorted((int(m.group(1)), p) for p in root.glob("global_step*") if p.is_dir() and (m := _STEP_DIR.match(p.name)))
    return steps[-1][1] if steps else None


@dataclass
class Zero3Checkpoint:
    """An opened ZeRO-3 checkpoint: parameter order and shapes, and each rank's fp32 partition."""

    tag_dir: Path
    world_size: int
    param_shapes: dict[str, tuple[int, ...]]  # trainable params, in partition order
    offsets: dict[str, int]  # per-rank element offset of each param's chunk
    flat: list[list[Any]]  # per rank: its fp32 flat groups (memory-mapped)
    ds_version: str | None = None

    @classmethod
    def open(cls, tag_dir: Path) -> Zero3Checkpoint:
        model_files = _rank_files(tag_dir, "model")
        optim_files = _rank_files(tag_dir, "optim")
        if not optim_files or not model_files:
            raise BridgeError(
                f"{tag_dir}: missing *_model_states.pt or *_optim_states.pt.",
                fix="the DeepSpeed checkpoint is incomplete; copy the whole global_stepN directory",
            )
        model_states = _load(model_files[0], mmap=False)
        shapes_groups = model_states.get("param_shapes") if isinstance(model_states, dict) else None
        if not isinstance(shapes_groups, list):
            raise BridgeError(f"{model_files[0]}: no 'param_shapes'; not a ZeRO-3 model-states file.", fix="pass a DeepSpeed ZeRO-3 checkpoint")
        param_shapes = {name: tuple(int(d) for d in shape) for group in shapes_groups for name, shape in group.items()}
        flat: list[list[Any]] = []
        world_size = len(optim_files)
        for i, path in enumerate(optim_files):
            state = _load(path, mmap=True)
            osd = state.get("optimizer_state_dict") if isinstance(state, dict) else None
            if not isinstance(osd, dict) or "fp32_flat_groups" not in osd:
                raise BridgeError(f"{path}: no fp32_flat_groups; not a ZeRO-3 optimizer-states file.", fix="pass a DeepSpeed ZeRO-3 checkpoint")
            stage = int(osd.get("zero_stage", 0))
            partitions = osd.get("partition_count")
            partitions = max(partitions) if isinstance(partitions, list) else partitions
            if stage != 3 or (partitions is not None and int(partitions) != world_size):
                raise BridgeError(
                    f"{path}: zero_stage={stage}, partition_count={partitions}, but {world_size} rank file(s) found.",
                    fix="recovery needs a complete ZeRO-3 checkpoint: all ranks' *_optim_states.pt from one step",
                )
            flat.append(list(osd["fp32_flat_groups"]))
            del state, osd  # drop Adam moments (memory-mapped, never touched)
        offsets, offset = {}, 0
        for name, shape in param_shapes.items():
            offsets[name] = offset
            offset += math.ceil(math.prod(shape) / world_size)
        have = sum(t.numel() for t in flat[0])
        if have < offset:
            raise BridgeError(
                f"{tag_dir}: rank 0 holds {have} fp32 elements but param_shapes needs {offset}.",
                fix="the checkpoint's rank files come from different runs; copy the whole global_stepN directory again",
            )
        return cls(tag_dir, world_size, param_shapes, offsets, flat, model_states.get("ds_version"))

    def recover(self, name: str) -> Any:
        """One parameter's fp32 values (a new tensor), gathered from every rank's partition."""
        import torch

        shape = self.param_shapes[name]
        numel = math.prod(shape)
        chunk = math.ceil(numel / self.world_size)
        start = self.offsets[name]
        pieces = [_slice_groups(groups, start, chunk) for groups in self.flat]
        out = torch.cat(pieces)  # a fresh tensor: nothing below still points into the mapping
        out = out[:numel].view(shape) if out.numel() == numel else out[:numel].clone().view(shape)
        for piece in pieces:
            _release_mapped_pages(piece)
        return out


def _release_mapped_pages(view: Any) -> None:
    """Drop the file-backed pages under ``view`` from our resident set once copied out.

    The flat groups are memory-mapped from the checkpoint (``torch.load(mmap=True)``, a private,
    read-only-in-practice file mapping): pages we touched would otherwise stay resident until the
    end, so recovering N GB would cost N GB of RSS. ``MADV_DONTNEED`` on clean file-backed pages
    just unmaps them; touching them again re-reads the file. Linux only; elsewhere a no-op.
    """
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    addr = view.data_ptr()
    lo = -(-addr // page) * page  # only pages wholly inside the view
    hi = (addr + view.numel() * view.element_size()) // page * page
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


@cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _slice_groups(groups: list[Any], start: int, length: int) -> Any:
    """Elements [start, start+length) of a rank's groups read as one vector (a param may straddle two)."""
    import torch

    out, pos = [], 0
    for g in groups:
        n = g.numel()
        lo, hi = max(start, pos), min(start + length, pos + n)
        if lo < hi:
            out.append(g.view(-1)[lo - pos : hi - pos])
        pos += n
        if pos >= start + length:
            break
    return torch.cat(out) if len(out) != 1 else out[0]


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


def _load(path: Path, *, mmap: bool) -> Any:
    return safe_torch_load(path, extra_globals=deepspeed_globals(), mmap=mmap)
