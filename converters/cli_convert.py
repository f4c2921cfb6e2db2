"""Convert any Gemma 4 LoRA adapter to the canonical, server-ready layout: standard PEFT safetensors
whose keys name the nn.Linear that really gets the delta (towers: '...q_proj.linear'), an explicit
target_modules list, and unchanged scaling (r, lora_alpha, rsLoRA, rank/alpha patterns).

Handles: PEFT all-linear; custom clippable-layer adapters without '.linear'; hand-saved state
dicts with '.default.' adapter names or without the 'base_model.model.' prefix; regex
target_modules; pickle .bin weights (read with weights_only); k/v tensors for KV-shared layers
(dropped, with a warning that counts them); ZeRO-3-damaged adapters (zero-element tensors),
recovered from the DeepSpeed checkpoint found next to the adapter or given with --zero3-checkpoint.
The input is never modified; OUT appears only when complete.

examples:
  gemma4-bridge convert ./checkpoint-500 -o ./adapter-fixed --base ./gemma-4-E4B-it
  gemma4-bridge convert ./adapter -o ./fixed --zero3-checkpoint ./run/checkpoint-500
"""

from __future__ import annotations

import argparse

HELP = "rewrite an adapter into the canonical layout (renames, drops, ZeRO-3 recovery)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter directory (adapter_config.json + weights)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="new directory for the canonical adapter")
    parser.add_argument(
        "--base", metavar="MODEL_DIR",
        help="base Gemma 4 checkpoint; default: base_model_name_or_path from adapter_config.json if it is a local dir",
    )  # fmt: skip
    parser.add_argument("--zero3-checkpoint", metavar="DIR", help="DeepSpeed checkpoint dir ('latest' + global_stepN/); default: look next to the adapter")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from gemma4_bridge.converters.convert import convert_adapter

    plan = convert_adapter(args.adapter, args.output, base=args.base, zero3_checkpoint=args.zero3_checkpoint, force=args.force)
    recovered = sum(t.from_zero3 for t in plan.tensors)
    print(
        f"wrote {args.output}: {len(plan.tensors)} tensors in {len(plan.modules)} modules "
        f"(from: {', '.join(plan.flavours)}; renamed {plan.renamed}, dropped {len(plan.dropped)}, "
        f"recovered from ZeRO-3 {recovered})"
    )
    return 0
