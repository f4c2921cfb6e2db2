"""Say what an adapter is, what is wrong with it, and what vLLM and SGLang would do with it.

Verdicts are for the releases pinned by this project (vLLM 0.32, SGLang 0.5.23), as measured or
read from their code (see the field notes); "loads" means loads *and* serves what was trained.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gemma4_bridge.adapter_io import AdapterDir
from gemma4_bridge.errors import BridgeError, ErrorCode
from gemma4_bridge.layout import LANGUAGE_MODEL, NON_LANGUAGE, Gemma4Layout

from .canonical import CanonicalPlan, Problem, find_layout, plan

Status = Literal["healthy", "fixable", "broken"]
EXIT_CODES: dict[str, int] = {"healthy": 0, "fixable": 1, "broken": 3}
LoadStatus = Literal["loads", "loads, silently wrong", "fails"]


@dataclass
class Verdict:
    server: str
    status: LoadStatus
    notes: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    adapter: str
    base: str | None
    status: Status
    flavours: list[str]
    problems: list[Problem]
    verdicts: list[Verdict]
    summary: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        return d


def inspect_adapter(
    adapter: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    zero3_checkpoint: str | os.PathLike[str] | None = None,
    scan_values: bool = True,
) -> InspectReport:
    """Analyse ``adapter`` (reads headers; with ``scan_values`` also every value, for NaN/Inf)."""
    ad = AdapterDir.open(adapter)
    layout = find_layout(base, ad.config)
    p = plan(ad.path, layout, zero3_checkpoint=zero3_checkpoint)
    problems = list(p.problems)
    if scan_values:
        from .convert import progress_bar

        with progress_bar(len(p.tensors), "inspect") as bar:
            for entry in p.tensors:
                try:
                    p.load(entry)
                except BridgeError as err:
                    code = str(err.code or ErrorCode.UNREADABLE)
                    problems.append(Problem(code, "broken", err.message, err.fix or "", (entry.source_key,)))
                bar.update(1)
    if layout is None:
        problems.append(
            Problem("no-base", "note", "no base model: shapes, KV-shared layers and tower '.linear' placement were not checked.",
                    "pass --base MODEL_DIR")  # fmt: skip
        )
    status: Status = "broken" if any(q.severity == "broken" for q in problems) else (
        "fixable" if any(q.severity == "fixable" for q in problems) else "healthy"
    )  # fmt: skip
    return InspectReport(
        adapter=str(ad.path),
        base=layout.source if layout else None,
        status=status,
        flavours=p.flavours,
        problems=problems,
        verdicts=server_verdicts(p, layout, problems),
        summary=_summary(p),
    )


def _summary(p: CanonicalPlan) -> dict[str, Any]:
    components = Counter(m.site.component for m in p.modules)
    ranks = sorted({m.rank for m in p.modules})
    return {
        "tensors": len(p.tensors),
        "modules": len(p.modules),
        "modules_per_component": dict(components),
        "ranks": ranks,
        "lora_alpha": p.source_config.get("lora_alpha"),
        "use_rslora": bool(p.source_config.get("use_rslora")),
        "dtypes": sorted({t.dtype for t in p.tensors}),
        "dropped": len(p.dropped),
        "zero3_recoverable": sum(t.from_zero3 for t in p.tensors),
    }


def server_verdicts(p: CanonicalPlan, layout: Gemma4Layout | None, problems: list[Problem]) -> list[Verdict]:
    codes = {q.code for q in problems if q.severity != "note"}
    broken = [q for q in problems if q.severity == "broken"]
    towers = sorted({m.site.component for m in p.modules} & set(NON_LANGUAGE))
    max_rank = max((m.rank for m in p.modules), default=0)

    # Stock vLLM 0.32
    vllm = Verdict("vLLM 0.32 (stock)", "loads")
    fatal = {
        "zero-element": "zero-element tensors kill the engine (EngineDeadError), not just the request",
        "adapter-name-in-keys": "'.lora_A.default.weight' keys are 'unsupported LoRA weight' and kill the engine",
        "modules-to-save": "modules_to_save is refused", "dora": "DoRA is refused", "bias": "LoRA bias is refused",
        "custom-clippable": "tower keys without '.linear' name modules vLLM cannot wrap (expected target modules error)",
        "kv-shared-module": "tensors for k/v projections that KV-shared layers do not have are rejected",
    }  # fmt: skip
    flags = set(p.flavours) | codes
    for code, why in fatal.items():
        if code in flags:
            vllm.status = "fails"
            vllm.notes.append(why)
    if broken and vllm.status != "fails":
        vllm.status, vllm.notes = "fails", [*vllm.notes, f"broken adapter: {broken[0].message}"]
    if layout is not None and vllm.status == "loads":
        k_eq_v = [m for m in p.modules if m.site.text_layer in layout.k_eq_v_layers and m.site.path.endswith("k_proj")]
        if k_eq_v:
            vllm.status = "loads, silently wrong"
            vllm.notes.append(
                f"k_proj LoRA on attention_k_eq_v layer(s) {sorted({m.site.text_layer for m in k_eq_v})}: vLLM does not "
                "apply it to V (measured logprob error ~0.2); use the gemma4-bridge plugin"
            )
    if towers:
        vllm.notes.append(f"{', '.join(towers)} LoRA is silently ignored unless the server runs with --enable-tower-connector-lora")
    if max_rank:
        vllm.notes.append(f"start the server with --max-lora-rank >= {max_rank}")

    plugin = Verdict("vLLM + gemma4-bridge plugin", "loads" if not broken else "fails")
    if broken:
        plugin.notes.append(broken[0].message)
    elif "zero-element" in codes:
        plugin.status = "fails"
        plugin.notes.append("run 'gemma4-bridge convert' first to recover the ZeRO-3 values")
    elif codes:
        plugin.notes.append("names are normalised at load; 'gemma4-bridge convert' makes the file loadable everywhere")

    sglang = Verdict("SGLang 0.5.23 (stock)", "loads")
    if broken or {"zero-element", "adapter-name-in-keys", "regex-target-modules"} & flags:
        sglang.status = "fails"
        if "regex-target-modules" in flags:
            sglang.notes.append("regex target_modules are rejected (only 'all'/'all-linear' or a list)")
        if "zero-element" in flags or "adapter-name-in-keys" in flags:
            sglang.notes.append("zero-element or '.default.' tensors cannot be loaded")
    if layout is not None:
        kv_targets = [m for m in p.modules if m.site.component == LANGUAGE_MODEL and m.site.path.endswith(("k_proj", "v_proj"))]
        if kv_targets and (layout.kv_shared_layers or layout.k_eq_v_layers):
            sglang.status = "fails"
            sglang.notes.append("k/v LoRA on a base with KV-shared or k_eq_v layers: SGLang reads v_proj unconditionally (KeyError, sglang issue 25913)")
        head_dims = {layer.head_dim for layer in layout.text_layers}
        if len(head_dims) > 1 and any(m.site.path.endswith(("q_proj", "o_proj")) and m.site.component == LANGUAGE_MODEL for m in p.modules):
            sglang.status = "fails"
            sglang.notes.append(f"per-layer head sizes {sorted(head_dims)}: SGLang sizes q/o LoRA from one head_dim")
    if towers:
        sglang.notes.append(f"{', '.join(towers)} LoRA is not supported and is silently ignored")
    return [vllm, plugin, sglang]


def format_report(report: InspectReport, adapter_arg: str, base_arg: str | None) -> str:
    """Human-readable report: what it is, what is wrong and how to fix it, what servers do."""
    s = report.summary
    lines = [
        f"adapter:  {report.adapter}",
        f"base:     {report.base or 'not given (pass --base MODEL_DIR for shape and KV-sharing checks)'}",
        f"flavour:  {', '.join(report.flavours)}",
        f"tensors:  {s['tensors']} in {s['modules']} modules "
        f"({', '.join(f'{k} {v}' for k, v in sorted(s['modules_per_component'].items())) or 'none'}); "
        f"rank {'/'.join(map(str, s['ranks'])) or '-'}, alpha {s['lora_alpha']}, rsLoRA {'yes' if s['use_rslora'] else 'no'}, "
        f"{'/'.join(s['dtypes']) or '-'}",
    ]
    if report.problems:
        lines.append("problems:")
        for q in report.problems:
            lines.append(f"  [{q.severity}] {q.message}")
            if q.fix:
                lines.append(f"      fix: {q.fix}")
    else:
        lines.append("problems: none")
    lines.append("servers:")
    for v in report.verdicts:
        lines.append(f"  {v.server:30s} {v.status}")
        lines.extend(f"      - {n}" for n in v.notes)
    base_opt = f" --base {base_arg}" if base_arg else ""
    verdict = {
        "healthy": "HEALTHY: canonical layout, nothing to fix (exit 0)",
        "fixable": f"FIXABLE: run 'gemma4-bridge convert {adapter_arg} -o OUT{base_opt}' (exit 1)",
        "broken": "BROKEN: convert cannot fix the problems above (exit 3)",
    }[report.status]
    lines.append(f"verdict:  {verdict}")
    return "\n".join(lines)

