"""The arguments every adapter command shares, worded once so `--help` says the same everywhere."""

from __future__ import annotations

import argparse

BASE_DEFAULT = "base Gemma 4 checkpoint; default: base_model_name_or_path from adapter_config.json if it is a local dir"


def add_adapter_arguments(
    parser: argparse.ArgumentParser, *, output: str | None = None, output_metavar: str = "OUT", base: str = BASE_DEFAULT, base_required: bool = False
) -> None:
    """ADAPTER, [-o OUT], --base, --zero3-checkpoint and, for commands that write OUT, --force."""
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter directory (adapter_config.json + weights)")
    if output is not None:
        parser.add_argument("-o", "--output", required=True, metavar=output_metavar, help=output)
    parser.add_argument("--base", required=base_required, metavar="MODEL_DIR", help=base)
    parser.add_argument(
        "--zero3-checkpoint", metavar="DIR",
        help="DeepSpeed checkpoint dir ('latest' + global_stepN/) for a ZeRO-3-damaged adapter; default: look next to the adapter",
    )  # fmt: skip
    if output is not None:
        parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
