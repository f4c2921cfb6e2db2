"""Write the canonical adapter to disk: streamed tensor by tensor, atomically, never over the input."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from gemma4_bridge.adapter_io import CONFIG_NAME, METADATA_KEY, SAFETENSORS_NAME, AdapterDir
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.output import atomic_output_dir, check_output

from .canonical import plan, require_layout
from .plans import CanonicalPlan
from .safetensors_stream import TensorSpec, write_streaming

log = logging.getLogger("gemma4_bridge.convert")


def progress_bar(total: int, desc: str, unit: str = "tensor") -> Any:
    """tqdm on a terminal, silent when stderr is piped or captured."""
    from tqdm import tqdm

    # A pty that reports a 0x0 size (ssh without a size, `script`) would make tqdm print nothing.
    size = shutil.get_terminal_size((80, 20))
    return tqdm(
        total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False, ncols=size.columns, nrows=size.lines
    )


def refuse_overwriting_input(inputs: list[Path], out: Path) -> None:
    """The input is never modified: refuse an output that is, contains or lies inside an input."""
    target = out.resolve()
    for src in inputs:
        s = src.resolve()
        if target == s or s in target.parents or target in s.parents:
            raise BridgeError(f"{out}: the output overlaps the input {src}.", fix="write the output to a new directory")


def convert_adapter(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    zero3_checkpoint: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> CanonicalPlan:
    """Convert ``adapter`` to the canonical layout in ``out``; returns the plan (the report).

    Raises :class:`BridgeError` (nothing written) if the adapter cannot be served as trained.
    """
    with _no_cyclic_gc():
        return _convert(Path(adapter), Path(out), base, zero3_checkpoint, force)


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: with torch imported each full pass scans millions of
    objects (~60 ms measured, triggered 1-2 times by a convert's small allocations), and convert
    creates no reference cycles worth collecting. Reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _convert(
    adapter: Path, out_path: Path, base: str | os.PathLike[str] | None, zero3_checkpoint: str | os.PathLike[str] | None, force: bool
) -> CanonicalPlan:
    ad = AdapterDir.open(adapter)
    layout = require_layout(ad.path, ad.config, base)
    inputs = [ad.path] + ([Path(zero3_checkpoint)] if zero3_checkpoint else [])
    refuse_overwriting_input(inputs, out_path)
    p = plan(ad.path, layout, zero3_checkpoint=zero3_checkpoint)
    p.raise_if_broken()
    check_output(out_path, force=force)  # fail before reading any tensor
    for key, why in p.dropped:
        log.debug("dropped %s: %s", key, why)
    if p.dropped:
        log.warning("warning: dropped %d tensor(s) for modules the model does not have (%s)", len(p.dropped), p.dropped[0][1])
    entries = {e.key: e for e in p.tensors}
    specs = [TensorSpec(e.key, e.shape, e.dtype) for e in p.tensors]
    metadata = {"format": "pt", METADATA_KEY: json.dumps(p.metadata(), sort_keys=True)}
    scratch = _scratch(max((s.nbytes for s in specs), default=0))

    def produce(spec: TensorSpec) -> Any:
        # A renamed tensor's bytes go straight from the mapped source to the output, a recovered
        # one's from the rank files (both copied in the kernel); anything else (cast, stacked)
        # through one reused buffer: no page faults on a fresh allocation
        # per tensor; written before reuse.
        entry = entries[spec.name]
        raw = p.raw_bytes(entry)
        return raw if raw is not None else p.load(entry, scratch)

    try:
        with atomic_output_dir(out_path, force=force) as tmp, progress_bar(len(specs), "convert") as bar:
            with p.copying_recovered():  # raises here, before the commit, if a recovered value is NaN/Inf
                write_streaming(
                    tmp / SAFETENSORS_NAME, specs, produce, metadata, lambda _: bar.update(1), data_start=p.copy_data_start()
                )
            (tmp / CONFIG_NAME).write_text(json.dumps(p.config, indent=2, sort_keys=True) + "\n")
    finally:
        p.close()
    return p


def _scratch(nbytes: int) -> Any:
    import torch

    return torch.empty(nbytes, dtype=torch.uint8)
