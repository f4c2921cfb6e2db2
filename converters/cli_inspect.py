"""Say what a Gemma 4 LoRA adapter is, list everything wrong with it, and predict what vLLM and
SGLang will do with it (load, fail, or load and silently serve something else).

Exit status: 0 healthy (canonical, nothing to fix), 1 fixable (run 'gemma4-bridge convert'),
3 broken (convert cannot fix it), 2 unreadable input or bad usage.

examples:
  gemma4-bridge inspect ./checkpoint-500 --base ./gemma-4-E4B-it
  gemma4-bridge inspect ./my-adapter --json | jq .verdicts
"""

from __future__ import annotations

import argparse
import json

from .cli_args import add_adapter_arguments

HELP = "diagnose an adapter: flavour, problems, vLLM/SGLang verdicts (exit 0/1/3)"


def configure(parser: argparse.ArgumentParser) -> None:
    add_adapter_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-scan", action="store_true", help="skip reading every value (NaN/Inf check); headers only")


def run(args: argparse.Namespace) -> int:
    from gemma4_bridge.converters.inspect import format_report, inspect_adapter

    report = inspect_adapter(args.adapter, base=args.base, zero3_checkpoint=args.zero3_checkpoint, scan_values=not args.no_scan)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(format_report(report, args.adapter, args.base))
    return report.exit_code
