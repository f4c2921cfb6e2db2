"""Say what an adapter is, what is wrong with it, and what vLLM and SGLang would do with it.

Verdicts come from the server profiles (:mod:`gemma4_bridge.servers`: stock vLLM 0.32, vLLM with
the plugin, stock SGLang 0.5.23, SGLang with the gemma4-bridge class), as measured or read from
their code (see the field notes); "loads" means loads *and* serves what was trained.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gemma4_bridge.adapter_io import AdapterDir
from gemma4_bridge.errors import BridgeError, ErrorCode
from gemma4_bridge.servers import PROFILES, LoadStatus

from .canonical import find_layout, plan
from .plans import CanonicalPlan, Problem

Status = Literal["healthy", "fixable", "broken"]
EXIT_CODES: dict[str, int] = {"healthy": 0, "fixable": 1, "broken": 3}


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
        verdicts=server_verdicts(p, problems),
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


def server_verdicts(p: CanonicalPlan, problems: list[Problem]) -> list[Verdict]:
    """Each server profile's verdict on the plan (server flags unknown: flag-dependent refusals are notes)."""
    verdicts = []
    for profile in PROFILES:
        status, notes = profile.verdict(p, problems)
        verdicts.append(Verdict(profile.name, status, notes))
    return verdicts


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
    width = max((len(v.server) for v in report.verdicts), default=0)
    for v in report.verdicts:
        lines.append(f"  {v.server:{width}s} {v.status}")
        lines.extend(f"      - {n}" for n in v.notes)
    base_opt = f" --base {base_arg}" if base_arg else ""
    verdict = {
        "healthy": "HEALTHY: canonical layout, nothing to fix (exit 0)",
        "fixable": f"FIXABLE: run 'gemma4-bridge convert {adapter_arg} -o OUT{base_opt}' (exit 1)",
        "broken": "BROKEN: convert cannot fix the problems above (exit 3)",
    }[report.status]
    lines.append(f"verdict:  {verdict}")
    return "\n".join(lines)

