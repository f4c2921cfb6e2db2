"""Report the installed stack and which known upstream Gemma 4 bugs are present here.

Prints the versions of torch, transformers, PEFT, TRL, accelerate, DeepSpeed, vLLM and SGLang,
then every known upstream bug (gemma4_bridge.upstream_bugs) with whether it is present in this
environment, the evidence (a probe on a tiny in-memory model, an upstream source fact, or a
measured version range) and what gemma4-bridge does about it. Paste it into bug reports.

examples:
  gemma4-bridge env
  gemma4-bridge env --json > env.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from gemma4_bridge import __version__

HELP = "show the installed stack and which upstream Gemma 4 bugs are present (for bug reports)"
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "bitsandbytes", "vllm", "sglang")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def collect() -> dict[str, Any]:
    """Versions and bug findings; vLLM and SGLang are read from their files, never imported."""
    from gemma4_bridge.plugins.vllm.upstream import SUPPORTED_VLLM
    from gemma4_bridge.plugins.sglang.upstream import SUPPORTED_SGLANG_RANGE
    from gemma4_bridge.upstream_bugs import installed, report

    packages = {name: installed(name) for name in PACKAGES}
    supported = {"vllm": SUPPORTED_VLLM, "sglang": SUPPORTED_SGLANG_RANGE}
    return {
        "gemma4_bridge": __version__,
        "python": platform.python_version(),
        "packages": packages,
        "supported": supported,
        # None: not installed; False: the plugin / class refuses to start next to this release.
        "plugin_supports": {
            name: None if packages[name] is None else Version(Version(packages[name]).base_version) in SpecifierSet(supported[name])
            for name in supported
        },
        "bugs": report(),
    }


def _text(info: dict[str, Any]) -> str:
    mark = {True: "PRESENT", False: "fixed", None: "n/a"}
    lines = [f"gemma4-bridge {info['gemma4_bridge']} (Python {info['python']})", ""]
    lines += [f"  {name:<13}{found or 'not installed'}" for name, found in info["packages"].items()]
    lines.append("")
    for name, ok in info["plugin_supports"].items():
        verdict = {None: "not installed", True: "supported", False: "REFUSED at start-up (outside the range)"}[ok]
        lines.append(f"  {name} plugin: {info['supported'][name]}: {verdict}")
    lines += ["", "upstream bugs:"]
    for bug in info["bugs"]:
        lines.append(f"  [{mark[bug['present']]}] {bug['key']}: {bug['summary']}")
        lines.append(f"      evidence: {bug['evidence']}")
        if bug["present"]:
            lines.append(f"      gemma4-bridge: {bug['action']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = collect()
    sys.stdout.write((json.dumps(info, indent=2) if args.json else _text(info)) + "\n")
    return 0
