"""Export a Gemma 4 LoRA adapter as a llama.cpp LoRA GGUF that applies PEFT's exact delta.

llama.cpp (``src/llama-adapter.cpp``, ``src/llama-graph.cpp`` ``build_lora_mm``) adds
``scale * B @ (A @ x)`` with ``scale = adapter.lora.alpha / rank`` (``rank`` read from each
``lora_b``; ``alpha == 0`` means ``scale = 1``), one alpha for the whole file. PEFT's per-module
scaling is ``alpha_m / r_m`` or, with rsLoRA, ``alpha_m / sqrt(r_m)`` (``alpha_pattern`` and
``rank_pattern`` give per-module values). We write the adapter's ``lora_alpha`` and fold
``scaling_m / (alpha / r_m)`` into each ``lora_b``, so llama.cpp's product is PEFT's delta for every
module. Tensors keep PEFT's layout: ``lora_a`` is ``[r, in]`` and ``lora_b`` ``[out, r]`` (numpy
order; ggml reads them as ``ne = [in, r]`` / ``[r, out]``), as ``convert_lora_to_gguf.py`` writes them.

Names come from gguf-py's own tensor map for ``MODEL_ARCH.GEMMA4`` (what ``convert_hf_to_gguf.py``
uses for the base), after the same ``language_model.`` strip. Gemma 4's converter transforms no
linear weight (no q/k permutation; its norms take no +1), so A and B need no permutation either.
Adapters go through the same planner as ``convert`` (any flavour, KV-shared k/v dropped, ZeRO-3
recovery). What llama.cpp cannot apply is refused with the route that works, never dropped.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gemma4_bridge import __version__
from gemma4_bridge.adapter_io import AdapterDir
from gemma4_bridge.errors import BridgeError

from gemma4_bridge.layout import LANGUAGE_MODEL, NON_LANGUAGE
from gemma4_bridge.output import atomic_output_file, check_output

from .canonical import plan, require_layout
from .plans import CanonicalPlan, ModuleDelta, Problem

if TYPE_CHECKING:
    from gemma4_bridge.layout import Gemma4Layout
    from gemma4_bridge.servers import Finding

log = logging.getLogger("gemma4_bridge.gguf_export")
OutType = Literal["f32", "f16"]
MERGE_ROUTE = (
    "merge it into the base with 'gemma4-bridge merge ADAPTER --base BASE -o MERGED', convert MERGED with "
    "llama.cpp's convert_hf_to_gguf.py (add --mmproj for the vision/audio GGUF) and serve that without --lora"
)
# Planner problems that only say "not a LoRA weight here" (e.g. an embedding's saved base layer);
# a specific reason (DoRA, embedding LoRA, towers, experts) is reported before them.
GENERIC_CODES = ("not-lora", "unknown-module", "saved-embedding-table")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise BridgeError("the 'gguf' package (llama.cpp's gguf-py) is not installed.", fix="pip install 'gemma4-bridge[llamacpp]'") from exc
    return gguf


def _lora_applied() -> dict[Any, str]:
    """llama.cpp tensor kind -> "" if gemma4's graph multiplies it through ``build_lora_mm`` (the LoRA
    applies; each kind measured by tests/test_gguf_export.py), else why a LoRA on it is refused."""
    T = _gguf().MODEL_TENSOR

    return {
        T.ATTN_Q: "", T.ATTN_K: "", T.ATTN_V: "", T.ATTN_OUT: "",
        T.FFN_GATE: "", T.FFN_UP: "", T.FFN_DOWN: "",
        T.PER_LAYER_INP_GATE: "", T.PER_LAYER_PROJ: "",
        T.PER_LAYER_MODEL_PROJ: "llama.cpp's gemma4 graph multiplies per_layer_model_proj with a plain ggml_mul_mat, "
                                "so a LoRA on per_layer_model_projection would load and never apply",
        T.FFN_GATE_INP: "MoE router LoRA is not verified against llama.cpp's gemma4 MoE path",
    }  # fmt: skip


@dataclass(frozen=True)
class GgufModule:
    """One exported LoRA pair: the module, its llama.cpp name and the factor folded into lora_b."""

    module: ModuleDelta
    name: str  # llama.cpp weight name, e.g. "blk.0.attn_q.weight"
    b_factor: float


@dataclass
class GgufExport:
    """What ``export-gguf`` decided (and wrote, once :func:`export_gguf` returns)."""

    plan: CanonicalPlan
    alpha: float  # adapter.lora.alpha written
    modules: list[GgufModule]
    refused: list[Problem]

    def raise_if_refused(self) -> None:
        if self.refused:
            first, more = self.refused[0], len(self.refused) - 1
            extra = f" ({more} more problem(s): run 'gemma4-bridge inspect')" if more else ""
            raise BridgeError(f"{first.message}{extra}", fix=first.fix or None)


def llamacpp_scale(alpha: float, rank: int) -> float:
    """The factor llama.cpp multiplies B @ A by (llama_adapter_lora_weight::get_scale, adapter scale 1)."""
    return alpha / rank if alpha else 1.0


@functools.lru_cache(maxsize=4)
def _name_map(n_blocks: int) -> Any:
    gguf = _gguf()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n_blocks)


def llamacpp_tensor_name(path: str, n_blocks: int) -> tuple[Any, str] | None:
    """(MODEL_TENSOR, "blk.N.xxx.weight") for a transformers module path, through gguf-py's map."""
    hf_name = path.replace(f"{LANGUAGE_MODEL}.", "", 1) + ".weight"  # as convert_hf_to_gguf's filter_tensors
    return _name_map(n_blocks).get_type_and_name(hf_name, try_suffixes=(".weight",))


def plan_gguf(p: CanonicalPlan, layout: Gemma4Layout) -> GgufExport:
    """Decide name and folded scale per module, and collect what llama.cpp cannot take."""
    applied = _lora_applied()
    alpha = float(p.source_config.get("lora_alpha", 8))
    refused: list[Problem] = [_refusal(q) for q in p.broken]
    if p.experts:  # the planner accepts expert LoRA (PEFT target_parameters); llama.cpp is not verified for it
        keys = tuple(e.a.source_key.split(",")[0] for e in p.experts)
        refused.append(Problem(
            "llamacpp-experts", "broken",
            f"{p.weights_label}: tensor {keys[0]} is a MoE expert LoRA ({len(keys)} expert parameter(s)); llama.cpp's "
            "gemma4 MoE path has no verified LoRA support for experts.",
            MERGE_ROUTE, keys,
        ))  # fmt: skip
    modules: list[GgufModule] = []
    for m in p.modules:
        where = f"{p.weights_label}: tensor {m.a.source_key}"
        if m.site.component in NON_LANGUAGE:
            refused.append(Problem(
                "llamacpp-tower", "broken",
                f"{where} is a {m.site.component} LoRA; llama.cpp runs Gemma 4's towers in mtmd (the --mmproj GGUF), "
                "which has no LoRA path, and its own convert_lora_to_gguf.py drops such tensors without a word.",
                MERGE_ROUTE, (m.a.source_key,),
            ))  # fmt: skip
            continue
        mapped = llamacpp_tensor_name(m.site.path, len(layout.text_layers))
        why = "gguf-py has no llama.cpp name for it" if mapped is None else applied.get(mapped[0], "llama.cpp applies no LoRA to it")
        if mapped is None or why:
            refused.append(Problem("llamacpp-unapplied", "broken", f"{where} targets {m.site.path}: {why}.", MERGE_ROUTE, (m.a.source_key,)))
            continue
        factor = m.scaling / llamacpp_scale(alpha, m.rank)
        modules.append(GgufModule(m, mapped[1], factor))
    refused.sort(key=lambda q: q.code in GENERIC_CODES)  # the most telling reason first
    return GgufExport(p, alpha, modules, refused)


def _refusal(q: Problem) -> Problem:
    """A planner's broken problem, said for llama.cpp (expert tensors get their own reason)."""
    experts = [t for t in q.tensors if ".experts." in t]
    if experts:
        return Problem(
            "llamacpp-experts", "broken",
            f"{q.message.split(':', 1)[0]}: tensor {experts[0]} is a MoE expert LoRA (PEFT target_parameters); "
            "llama.cpp's gemma4 MoE path has no verified LoRA support for experts.",
            "merge with PEFT (merge_and_unload), save, and convert the merged model with llama.cpp's convert_hf_to_gguf.py",
            q.tensors,
        )  # fmt: skip
    if q.code in ("dora", "embedding-lora", "bias", "modules-to-save", "trainable-tokens", "not-lora"):
        return Problem(q.code, "broken", f"{q.message} A llama.cpp adapter holds plain LoRA A/B pairs only.",
                       f"{q.fix}; then convert the merged model with llama.cpp's convert_hf_to_gguf.py", q.tensors)  # fmt: skip
    return q


def export_gguf(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    zero3_checkpoint: str | os.PathLike[str] | None = None,
    outtype: OutType = "f32",
    force: bool = False,
) -> GgufExport:
    """Write ``adapter`` as a llama.cpp LoRA GGUF at ``out`` (atomically); raises :class:`BridgeError`,
    writing nothing, if any part of it cannot be applied by llama.cpp as trained."""
    from .convert import progress_bar, refuse_overwriting_input

    ad = AdapterDir.open(adapter)
    layout = require_layout(ad.path, ad.config, base)
    out_path = Path(out)
    refuse_overwriting_input([ad.path] + ([Path(zero3_checkpoint)] if zero3_checkpoint else []), out_path)
    export = plan_gguf(plan(ad.path, layout, zero3_checkpoint=zero3_checkpoint), layout)
    export.raise_if_refused()
    if not export.modules:
        raise BridgeError(f"{ad.path}: the adapter has no LoRA module llama.cpp could apply.", fix="check target_modules")
    check_output(out_path, force=force)
    if export.plan.dropped:
        log.warning("warning: dropped %d tensor(s) for modules the model does not have (%s)", len(export.plan.dropped), export.plan.dropped[0][1])
    try:
        with atomic_output_file(out_path, force=force) as tmp, progress_bar(2 * len(export.modules), "export-gguf") as bar:
            _write(export, tmp, outtype, lambda: bar.update(1))
    finally:
        export.plan.close()
    return export


def _write(export: GgufExport, path: Path, outtype: OutType, tick: Any) -> None:
    """Header and tensor infos first, then one tensor at a time (never the whole adapter in memory)."""
    import numpy as np
    import torch

    gguf = _gguf()
    np_dtype = np.float32 if outtype == "f32" else np.float16
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA4])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, export.alpha)
    writer.add_string("gemma4_bridge.export", json.dumps({**export.plan.metadata(), "tool": f"gemma4-bridge {__version__}"}, sort_keys=True))
    parts = [(g, part) for g in export.modules for part in ("a", "b")]
    itemsize = np.dtype(np_dtype).itemsize
    for g, part in parts:
        entry = g.module.a if part == "a" else g.module.b
        writer.add_tensor_info(f"{g.name}.lora_{part}", entry.shape, np.dtype(np_dtype), int(np.prod(entry.shape)) * itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for g, part in parts:
        entry = g.module.a if part == "a" else g.module.b
        tensor = export.plan.load(entry).to(torch.float64)
        if part == "b":
            tensor = tensor * g.b_factor
        writer.write_tensor_data(np.ascontiguousarray(tensor.numpy().astype(np_dtype)))
        tick()
    writer.close()


def stock_findings(p: CanonicalPlan, problems: Sequence[Problem]) -> list[Finding]:
    """What llama.cpp does with this adapter converted by its own convert_lora_to_gguf.py (read from
    its code: one lora_alpha, a name filter that skips vision_/audio_ tensors; numbers measured in
    tests/test_gguf_export.py). The llama.cpp server profiles in gemma4_bridge.servers call this."""
    from gemma4_bridge.servers import Finding

    broken = [q for q in problems if q.severity == "broken"]
    if broken:
        return [Finding("fails", broken[0].code, f"broken adapter: {broken[0].message}")]
    out: list[Finding] = []
    alpha = float(p.source_config.get("lora_alpha", 8))
    language = [m for m in p.modules if m.site.component not in NON_LANGUAGE]
    rescaled = [m for m in language if abs(m.scaling - alpha / m.rank) > 1e-12 * abs(m.scaling)]
    if rescaled:
        m = rescaled[0]
        out.append(Finding(
            "loads, silently wrong", "llamacpp-scale",
            f"it writes lora_alpha={alpha:g} only, so llama.cpp scales every module by alpha/r; rsLoRA / alpha_pattern give "
            f"{len(rescaled)} module(s) another scale (e.g. {m.site.path}: PEFT {m.scaling:g}, llama.cpp {alpha / m.rank:g})",
            "gemma4-bridge export-gguf",
        ))  # fmt: skip
    towers = sorted({m.site.component for m in p.modules} & set(NON_LANGUAGE))
    if towers:
        out.append(Finding("loads, silently wrong", "llamacpp-towers", f"{', '.join(towers)} LoRA is dropped without a word (llama.cpp's mtmd has no LoRA path)"))
    if any(m.site.path.endswith("per_layer_model_projection") for m in language):
        out.append(Finding("loads, silently wrong", "llamacpp-unapplied", "the per_layer_model_projection LoRA loads but llama.cpp never applies it"))
    return out


def export_findings(p: CanonicalPlan, problems: Sequence[Problem]) -> list[Finding]:
    """What ``export-gguf`` does with this adapter: the same refusals :func:`export_gguf` raises."""
    from gemma4_bridge.servers import Finding

    if p.layout is None:
        return [Finding("note", "no-base", "pass --base to check what llama.cpp can apply")]
    if importlib.util.find_spec("gguf") is None:
        return [Finding("fails", "no-gguf", "export-gguf needs llama.cpp's gguf package: pip install 'gemma4-bridge[llamacpp]'")]
    export = plan_gguf(p, p.layout)
    extra = [_refusal(q) for q in problems if q.severity == "broken" and q not in p.problems]  # e.g. NaN/Inf found by a scan
    refused = export.refused + extra
    if refused:
        return [Finding("fails", q.code, f"refused: {q.message}", q.fix) for q in refused[:1]] + [
            Finding("note", "route", f"route: {refused[0].fix}")
        ]
    return [Finding("note", "command", "gemma4-bridge export-gguf ADAPTER --base BASE -o adapter.gguf; llama-server -m base.gguf --lora adapter.gguf")]


__all__ = ["GgufExport", "GgufModule", "export_findings", "export_gguf", "llamacpp_scale", "llamacpp_tensor_name", "plan_gguf", "stock_findings"]
