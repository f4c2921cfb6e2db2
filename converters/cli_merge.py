"""Merge a Gemma 4 LoRA adapter into its base model, for servers without LoRA support.

Streams shard by shard and tensor by tensor (memory: one tensor, not the model); safetensors in,
safetensors out, shard index rewritten, config/tokenizer/processor files copied. Tower deltas go
to '...linear.weight', inside Gemma4ClippableLinear's clamp, as PEFT applies them; bf16 stays bf16.
Any adapter 'convert' accepts can be merged (ZeRO-3 recovery included).

examples:
  gemma4-bridge merge ./adapter --base ./gemma-4-E4B-it -o ./gemma-4-E4B-merged
"""

from __future__ import annotations

import argparse

from .cli_args import add_adapter_arguments

HELP = "merge an adapter into the base weights (streamed, inside the clamp)"


def configure(parser: argparse.ArgumentParser) -> None:
    add_adapter_arguments(parser, output="new directory for the merged checkpoint", base="base Gemma 4 checkpoint (safetensors)", base_required=True)


def run(args: argparse.Namespace) -> int:
    from gemma4_bridge.converters.merge import merge_adapter

    result = merge_adapter(args.adapter, args.base, args.output, zero3_checkpoint=args.zero3_checkpoint, force=args.force)
    print(f"wrote {result.out}: {result.merged_weights} weight(s) merged across {result.shards} shard(s)")
    return 0
