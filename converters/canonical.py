"""Turn any Gemma 4 LoRA adapter into the canonical layout, in memory: the one place that decides.

``convert`` (to disk), ``merge``, ``inspect`` and the serving plugins all call :func:`plan` (or
:func:`canonicalize`), so an adapter is renamed, dropped or refused the same way everywhere.

A plan is built from tensor *shapes* only (safetensors headers); values are read one tensor at a
time when :meth:`CanonicalPlan.load` is called, so a plan for a 1 GB adapter costs kilobytes.
Problems are collected, not raised: ``fixable`` ones the plan fixes (renames, KV-shared tensors
dropped, ZeRO-3 values recovered), ``broken`` ones it cannot; :meth:`CanonicalPlan.raise_if_broken`
turns the first broken problem into a :class:`BridgeError` naming file, tensor and fix.

The work is split by job: :mod:`.sources` (tensor access), :mod:`.plans` (the plan dataclasses),
:mod:`.planner` (the steps), :mod:`.peft_config` (PEFT's rank/alpha/scaling semantics).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemma4_bridge.adapter_io import AdapterDir
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import Gemma4Layout

from .planner import Planner
from .plans import CanonicalPlan
from .sources import TensorSource


def find_layout(base: str | os.PathLike[str] | None, adapter_config: Mapping[str, Any] | None = None) -> Gemma4Layout | None:
    """The base model's layout: ``base`` if given, else ``base_model_name_or_path`` if it is a local model dir."""
    if base is not None:
        return Gemma4Layout.from_model_dir(base)
    guess = (adapter_config or {}).get("base_model_name_or_path")
    if guess and (Path(guess) / "config.json").is_file():
        return Gemma4Layout.from_model_dir(guess)
    return None



def require_layout(adapter_dir: str | os.PathLike[str], adapter_config: Mapping[str, Any], base: str | os.PathLike[str] | None) -> Gemma4Layout:
    """:func:`find_layout`, or the error that says to pass ``--base`` (tools that write need the base)."""
    layout = find_layout(base, adapter_config)
    if layout is None:
        raise BridgeError(
            f"{adapter_dir}: no base model given and base_model_name_or_path={adapter_config.get('base_model_name_or_path')!r} "
            "is not a local model directory.",
            fix="pass --base MODEL_DIR (the Gemma 4 checkpoint the adapter was trained on)",
        )
    return layout

def canonicalize(
    adapter: str | os.PathLike[str] | tuple[Mapping[str, Any], Mapping[str, Any]],
    layout: Gemma4Layout,
    *,
    zero3_checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], CanonicalPlan]:
    """Canonical ``(config, tensors, plan)`` for an adapter directory or an in-memory ``(config, tensors)``.

    Raises :class:`BridgeError` if the adapter cannot be served as trained. ``plan`` is the report:
    ``plan.flavours``, ``plan.problems`` (fixed ones included), ``plan.dropped``, ``plan.metadata()``.
    """
    p = plan(adapter, layout, zero3_checkpoint=zero3_checkpoint)
    p.raise_if_broken()
    return p.config, {entry.key: tensor for entry, tensor in p.iter_tensors()}, p


def plan(
    adapter: str | os.PathLike[str] | tuple[Mapping[str, Any], Mapping[str, Any]],
    layout: Gemma4Layout | None,
    *,
    zero3_checkpoint: str | os.PathLike[str] | None = None,
    find_zero3: bool = True,
) -> CanonicalPlan:
    """Decide names, drops and recoveries for an adapter; see the module docstring.

    With ``layout=None`` (no base model known) only name-level checks run: shapes, KV sharing and
    tower ``.linear`` placement need the base.
    """
    if isinstance(adapter, tuple):
        config, tensors = dict(adapter[0]), adapter[1]
        source, label, is_pickle = "<in-memory adapter>", "<in-memory adapter>", False
        tensor_source = TensorSource.from_tensors(label, tensors)
        adapter_dir: Path | None = None
    else:
        ad = AdapterDir.open(adapter)
        config, source, label, is_pickle = ad.config, str(ad.path), str(ad.weights), ad.is_pickle
        tensor_source = TensorSource.from_adapter_dir(ad)
        adapter_dir = ad.path
    return Planner(config, tensor_source, layout, source, label, is_pickle, adapter_dir, zero3_checkpoint, find_zero3).run()
