"""The plan: everything decided about one adapter before any tensor value is read.

:class:`CanonicalPlan` is what the planner (:mod:`.planner`) produces and what convert, merge,
inspect and the server profiles read: problems found, canonical tensors and the LoRA'd modules.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gemma4_bridge import __version__
from gemma4_bridge.errors import BridgeError, ErrorCode
from gemma4_bridge.layout import Gemma4Layout, LinearSite

from .safetensors_stream import COPY_ALIGN, DTYPES, FileRange, FileRanges
from .sources import TensorSource, unreadable

if TYPE_CHECKING:
    from .experts import ExpertDelta
    from .zero3 import Zero3Checkpoint

Severity = Literal["fixable", "broken", "note"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an adapter, with what fixes it."""

    code: str  # stable id, e.g. "zero-element", "kv-shared-module", "shape-mismatch"
    severity: Severity
    message: str
    fix: str = ""
    tensors: tuple[str, ...] = ()

    def as_error(self) -> BridgeError:
        return BridgeError(self.message, fix=self.fix or None)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the canonical adapter and where its values come from."""

    key: str  # canonical key
    source_key: str  # key in the source adapter
    shape: tuple[int, ...]
    dtype: str  # torch dtype name of the output (the source tensor's dtype)
    from_zero3: bool = False  # values recovered from the DeepSpeed checkpoint
    # Built from several source tensors (per-expert LoRA stacked into PEFT's 3-D expert form):
    # called with the source getter; ``source_key`` then lists the sources, comma-separated.
    recipe: Callable[[Callable[[str], Any]], Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ModuleDelta:
    """One LoRA'd linear of the canonical adapter: delta = scaling * B @ A on ``site``."""

    site: LinearSite
    a: PlannedTensor
    b: PlannedTensor
    rank: int
    alpha: float
    scaling: float


@dataclass
class CanonicalPlan:
    """Everything decided about one adapter before any tensor value is read."""

    source: str  # adapter directory (or label of in-memory tensors)
    weights_label: str  # the weights file, for messages
    source_config: dict[str, Any]
    config: dict[str, Any]  # canonical adapter_config.json
    flavours: list[str]
    problems: list[Problem]
    tensors: list[PlannedTensor]
    modules: list[ModuleDelta]
    dropped: list[tuple[str, str]]  # (source key, why)
    renamed: int
    zero3: Zero3Checkpoint | None
    _source: TensorSource = field(repr=False)
    layout: Gemma4Layout | None = field(default=None, repr=False)  # the base it was planned against
    # LoRA on MoE layers' 3-D expert parameters (PEFT target_parameters form); not in ``modules``,
    # which are linears: every consumer decides explicitly what to do with these.
    experts: list[ExpertDelta] = field(default_factory=list)

    @property
    def broken(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "broken"]

    @property
    def fixable(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "fixable"]

    @property
    def healthy(self) -> bool:
        return not self.broken and not self.fixable

    def raise_if_broken(self) -> None:
        if self.broken:
            first = self.broken[0]
            more = len(self.broken) - 1
            if more:
                raise BridgeError(f"{first.message} ({more} more problem(s): run 'gemma4-bridge inspect').", fix=first.fix or None)
            raise first.as_error()

    def load(self, entry: PlannedTensor, scratch: Any = None) -> Any:
        """The values of one canonical tensor: read or recovered, cast, checked finite.

        With ``scratch`` (a uint8 tensor) a file-backed source tensor is read into it, no allocation.
        """
        import torch

        if entry.from_zero3:
            assert self.zero3 is not None
            tensor = self.zero3.recover(self.zero3_names[entry.key], scratch)
        elif entry.recipe is not None:
            tensor = entry.recipe(self._source.get)
        else:
            tensor = self._source.get(entry.source_key, scratch)
        tensor = tensor.to(getattr(torch, entry.dtype))
        self._check_finite(entry, tensor)
        return tensor

    def raw_bytes(self, entry: PlannedTensor) -> FileRange | FileRanges | None:
        """Where the source bytes of ``entry`` lie when they are its canonical bytes (a renamed
        tensor of a safetensors file, same dtype), checked finite; else None (use :meth:`load`).

        No tensor is built or copied: the check reads a memory-mapped window of the source, and
        the writer copies the range inside the kernel, as a file copy does. The range's file stays
        open until :meth:`close`. A recovered tensor is given as ranges of the rank files only
        inside :meth:`copying_recovered`, which checks it.
        """
        if entry.from_zero3:
            if self.zero3 is None or entry.key not in self._kernel_recovered:
                return None
            return self.zero3.file_ranges(self.zero3_names[entry.key])
        reader = self._source.reader
        if reader is None or self._mapped(entry) is None:
            return None
        return reader.file_range(entry.source_key)

    def copy_data_start(self) -> int | None:
        """The output data start (modulo :data:`COPY_ALIGN`) that puts the most bytes copied
        verbatim (:meth:`raw_bytes`) at their source offsets modulo it, when the output holds
        :attr:`tensors` in order: the kernel then copies whole folios (see ``write_streaming``).
        None when no tensor is copied verbatim."""
        reader = self._source.reader
        votes: dict[int, int] = {}
        offset = 0
        for entry in self.tensors:
            nbytes = math.prod(entry.shape) * DTYPES[entry.dtype][1]
            if self._verbatim(entry):
                shift = (reader.data_start + reader.header[entry.source_key]["data_offsets"][0] - offset) % COPY_ALIGN
                votes[shift] = votes.get(shift, 0) + nbytes
            offset += nbytes
        return max(votes, key=votes.__getitem__) if votes else None

    @contextlib.contextmanager
    def copying_recovered(self) -> Iterator[None]:
        """While open, :meth:`raw_bytes` gives each recovered tensor whose output dtype is the
        checkpoint's as ranges of the rank files (one per rank), for the writer to copy inside the
        kernel, and a thread checks those values finite on read-only maps meanwhile; leaving the
        block waits for it and raises the NaN/Inf error, so an output is never committed unchecked.

        Why: recovery is data movement (0.7 GB in the benchmark); reading it into this process and
        writing it back out from user space took 2-3x the wall time.
        """
        zero3 = self.zero3
        picked = [e for e in self.tensors if e.from_zero3 and e.dtype == zero3.dtype] if zero3 is not None else []
        if zero3 is None or not picked:
            yield
            return
        zero3.open_files()
        by_name = {self.zero3_names[e.key]: e for e in picked}
        stop = threading.Event()
        result: list[Any] = []

        def check() -> None:
            try:
                result.append(zero3.nonfinite(list(by_name), stop))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                result.append(exc)

        thread = threading.Thread(target=check, name="zero3-check", daemon=True)
        thread.start()
        self._kernel_recovered = {e.key for e in picked}
        try:
            yield
        except BaseException:
            stop.set()
            raise
        finally:
            thread.join()
            self._kernel_recovered = set()
        if isinstance(result[0], BaseException):
            raise result[0]
        if result[0] is not None:
            name, bad = result[0]
            raise self._nonfinite(by_name[name], bad)

    def check_values(self) -> None:
        """Read every value once and refuse NaN/Inf, keeping nothing: a safetensors source is
        checked in place through its mapped window (no copy), anything else through :meth:`load`."""
        try:
            for entry in self.tensors:
                if self._mapped(entry) is None:
                    self.load(entry)
        finally:
            self.close()

    def load_all(self, check_finite: bool = True) -> dict[str, Any]:
        """Every canonical tensor (canonical key -> tensor), checked finite unless ``check_finite``
        is False (the caller checked these very bytes already: the vLLM plugin's validated snapshots).

        A safetensors source's tensors are views of one private (copy-on-write) map of the file,
        as vLLM's in-tree loader has them: reading 760 MB into fresh memory cost 0.6-1.0 s, mostly
        page faults. Anything else: :meth:`load` (always checked: its values are computed here).
        """
        reader = self._source.reader
        direct = [e.source_key for e in self.tensors if self._verbatim(e)]
        try:
            read = reader.read_many(direct) if direct and reader is not None else {}
        except (OSError, ValueError) as exc:
            raise unreadable(self.weights_label, "its tensors", exc) from exc
        out = {}
        for entry in self.tensors:
            tensor = read.get(entry.source_key)
            if tensor is None:
                out[entry.key] = self.load(entry)
            else:
                if check_finite:
                    self._check_finite(entry, tensor)
                out[entry.key] = tensor
        return out

    def _verbatim(self, entry: PlannedTensor) -> bool:
        """Are ``entry``'s values its source tensor's bytes in a safetensors file (not recovered, built or cast)?"""
        reader = self._source.reader
        return not entry.from_zero3 and entry.recipe is None and reader is not None and reader.header[entry.source_key]["dtype"] == DTYPES[entry.dtype][0]

    def _mapped(self, entry: PlannedTensor) -> Any:
        """``entry``'s source values as a view of the mapped window, checked finite; None where
        they are not its canonical bytes (recovered, cast, pickled, unaligned)."""
        reader = self._source.reader
        if not self._verbatim(entry):
            return None
        try:
            mapped = reader.mapped(entry.source_key)
        except (OSError, ValueError) as exc:
            raise unreadable(self.weights_label, f"tensor {entry.source_key}", exc) from exc
        if mapped is None:
            return None
        self._check_finite(entry, mapped[1])
        return mapped[1]

    def close(self) -> None:
        """Release the source's memory-mapped window (see :meth:`raw_bytes`) and checkpoint files."""
        if self._source.reader is not None:
            self._source.reader.close()
        if self.zero3 is not None:
            self.zero3.close()

    def _check_finite(self, entry: PlannedTensor, tensor: Any) -> None:
        import torch

        # A sum is finite iff every value is (NaN/Inf propagate); only an overflowing sum of
        # huge finite values needs the exact, 20x slower element-wise check.
        if tensor.is_floating_point() and not math.isfinite(tensor.sum().item()) and not bool(torch.isfinite(tensor).all()):
            raise self._nonfinite(entry, int((~torch.isfinite(tensor)).sum()))

    def _nonfinite(self, entry: PlannedTensor, bad: int) -> BridgeError:
        where = f"{self.zero3.tag_dir} (recovered)" if entry.from_zero3 and self.zero3 else self.weights_label
        return BridgeError(
            f"{where}: tensor {entry.source_key} has {bad} NaN/Inf value(s); serving it would produce garbage.",
            fix="the training run diverged; use an earlier checkpoint or retrain with a lower learning rate",
            code=ErrorCode.NON_FINITE,
        )

    def iter_tensors(self) -> Iterator[tuple[PlannedTensor, Any]]:
        for entry in self.tensors:
            yield entry, self.load(entry)

    def metadata(self) -> dict[str, Any]:
        """The conversion record stored in the output's safetensors metadata."""
        return {
            "tool": f"gemma4-bridge {__version__}",
            "source": self.source,
            "source_flavours": self.flavours,
            "renamed_tensors": self.renamed,
            "dropped": [{"tensor": k, "why": why} for k, why in self.dropped],
            "zero3_recovered": sum(t.from_zero3 for t in self.tensors),
            "zero3_checkpoint": str(self.zero3.tag_dir) if self.zero3 else None,
        }

    zero3_names: dict[str, str] = field(default_factory=dict, repr=False)  # canonical key -> checkpoint name
    _kernel_recovered: set[str] = field(default_factory=set, repr=False)  # canonical keys: see copying_recovered
