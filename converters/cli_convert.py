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

from .cli_args import add_adapter_arguments

HELP = "rewrite an adapter into the canonical layout (renames, drops, ZeRO-3 recovery)"


def configure(parser: argparse.ArgumentParser) -> None:
    add_adapter_arguments(parser, output="new directory for the canonical adapter")


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
