"""Export a Gemma 4 LoRA adapter as a llama.cpp LoRA GGUF that applies PEFT's exact delta.

Language-model LoRA (attention, MLP, per-layer input gate/projection) is named as llama.cpp names the
base's tensors (gguf-py's GEMMA4 map); each module's PEFT scale (rsLoRA, rank_pattern, alpha_pattern
included) is folded into lora_b, so llama.cpp's alpha/rank gives PEFT's numbers. Any adapter
'convert' accepts works (naming flavours, KV-shared k/v dropped, ZeRO-3 recovery).

Refused, with the route that works, never dropped: vision/audio tower and connector LoRA (llama.cpp
runs the towers in mtmd, which has no LoRA path), per_layer_model_projection (llama.cpp never
applies a LoRA there), DoRA, embedding LoRA, MoE router/expert LoRA. The route: 'gemma4-bridge
merge', then llama.cpp's convert_hf_to_gguf.py (with --mmproj for the towers). OUT appears only
when complete.

examples:
  gemma4-bridge export-gguf ./adapter --base ./gemma-4-E4B-it -o adapter.gguf
  llama-server -m gemma-4-E4B-it.gguf --lora adapter.gguf
"""

from __future__ import annotations

import argparse

from .cli_args import add_adapter_arguments

HELP = "write a llama.cpp LoRA GGUF (PEFT's scaling folded in; towers refused with the merge route)"


def configure(parser: argparse.ArgumentParser) -> None:
    add_adapter_arguments(parser, output="the GGUF file to write", output_metavar="OUT.gguf")
    parser.add_argument("--outtype", choices=("f32", "f16"), default="f32", help="tensor type in the GGUF (default f32)")


def run(args: argparse.Namespace) -> int:
    import logging

    from gemma4_bridge.converters.gguf_export import export_gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # gguf-py logs every file it writes at INFO

    export = export_gguf(
        args.adapter, args.output, base=args.base, zero3_checkpoint=args.zero3_checkpoint, outtype=args.outtype, force=args.force
    )
    p = export.plan
    print(
        f"wrote {args.output}: {len(export.modules)} LoRA module(s) for llama.cpp (lora_alpha {export.alpha:g}, "
        f"PEFT scaling folded into lora_b; from: {', '.join(p.flavours)}; dropped {len(p.dropped)})"
    )
    return 0
