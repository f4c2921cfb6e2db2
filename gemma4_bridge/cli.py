"""``gemma4-bridge``: inspect, convert and merge Gemma 4 LoRA adapters; run the demo.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``configure(parser)`` and
``run(args) -> int``; this file only dispatches, turns :class:`BridgeError` (and any file-system
error) into a one-paragraph message with a non-zero exit, keeps tracebacks for ``--debug``, and
makes SIGTERM/SIGHUP stop a command the way Ctrl-C does (outputs cleaned up, exit 128 + signal).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence

from gemma4_bridge import __version__
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.output import Interrupted, interrupt_on_signals

# name -> module implementing it. Modules import heavy libraries (torch) lazily inside run().
SUBCOMMANDS: dict[str, str] = {
    "inspect": "gemma4_bridge.converters.cli_inspect",
    "convert": "gemma4_bridge.converters.cli_convert",
    "merge": "gemma4_bridge.converters.cli_merge",
    "export-gguf": "gemma4_bridge.converters.cli_export_gguf",
    "verify": "gemma4_bridge.verify",
    "demo": "gemma4_bridge.demo",
    "env": "gemma4_bridge.env_report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma4-bridge",
        description=(
            "Make Gemma 4 LoRA adapters (text, vision and audio towers) serve exactly what was trained. "
            "Inspect an adapter to see what vLLM/SGLang would do with it, convert any PEFT naming or "
            "ZeRO-3-damaged adapter to the canonical layout, or merge it into the base weights."
        ),
        epilog="Run 'gemma4-bridge COMMAND --help' for each command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"gemma4-bridge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    prefix = f"gemma4-bridge {args.command}"
    try:
        with interrupt_on_signals():
            return int(args._run(args) or 0)
    except BridgeError as err:
        if args.debug:
            raise
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # one the command did not anticipate: still one paragraph, no traceback
        if args.debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"{prefix}: error: {where}{err.strerror or err}. Fix: check that path and the disk (--debug shows where it failed).", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else 2
        done = exc.completed if isinstance(exc, Interrupted) else None
        what = f"{done} was already complete" if done else "no output was written (temporary files removed)"
        print(f"{prefix}: interrupted by {signal.Signals(signum).name}; {what}.", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
