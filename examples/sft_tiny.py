"""LoRA SFT of Gemma 4 on text, image and audio rows with trl, via gemma4-bridge's Gemma4SFTTrainer.

Runs as-is on a CPU with a tiny random Gemma 4 built locally (no download, ~30 s):

    OMP_NUM_THREADS=1 python examples/sft_tiny.py --out runs/tiny

The adapter in ``runs/tiny/adapter`` is canonical: the converters have nothing to convert, and vLLM
with the gemma4-bridge plugin serves it as is, towers included (with ``all-linear`` also the audio
attention's ``relative_k_proj``, which the plugin applies per audio item; stock vLLM cannot: add
``--exclude '.*relative_k_proj'`` for a server without the plugin).

    vllm serve <model> --enable-lora --enable-tower-connector-lora --lora-modules tiny=runs/tiny/adapter

The same script on a real Gemma 4 (one GPU, bf16; E2B fits in ~24 GB with checkpointing on):

    python examples/sft_tiny.py --model google/gemma-4-E2B-it --bf16 --steps 500 --lr 1e-4 \
        --data my_rows.jsonl --out runs/e2b

and on several GPUs with DeepSpeed ZeRO-3 (``examples/zero3.json``; the wrapper gathers the
partitioned LoRA weights when saving and repairs TRL's forced reentrant checkpointing):

    accelerate launch --num_processes 4 --use_deepspeed --deepspeed_config_file examples/zero3.json \
        examples/sft_tiny.py --model google/gemma-4-E4B-it --bf16 --data my_rows.jsonl --out runs/e4b
    # or: deepspeed --num_gpus 4 examples/sft_tiny.py --deepspeed examples/zero3.json ...

``--data`` is JSON Lines, one row per line: ``{"text": "...", "images": ["a.png"], "audio": ["a.npy"]}``
(images: file paths; audio: 16 kHz mono float32 arrays saved with numpy.save). Put the processor's
image/audio placeholder in the text once per item (``<|image|>``, ``<|audio|>`` on Gemma 4).
Under ZeRO-3 all ranks must use the same towers in each step (ZeRO-3 gathers parameters with
collectives; a text-only batch on one rank beside an image batch on another crashes gloo/NCCL):
keep modalities uniform per step, e.g. every row multimodal, or one modality per dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "low rank adaptation keeps the base frozen and learns a small delta.",
    "shared key value layers reuse the cache of an earlier layer.",
    "vision and audio towers clamp their inputs and outputs.",
]


def demo_rows(processor: Any, *, every_row_multimodal: bool = False) -> list[dict[str, Any]]:
    """Text, image and audio rows made of random pixels and noise: enough to exercise every tower.

    Under ZeRO-3 every rank must run the same modules in each step (the parameter all-gathers are
    collectives), so distributed runs get rows that each carry an image *and* a clip.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    rows: list[dict[str, Any]] = []
    for i, text in enumerate(TEXTS * 2):
        if every_row_multimodal:
            image = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
            clip = (rng.randn(4000) * 0.3).astype("float32")
            prompt = f"{processor.image_token} {processor.audio_token} {text}"
            rows.append({"text": prompt, "images": [image], "audio": [clip]})
            continue
        kind = i % 3
        if kind == 1:
            image = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
            rows.append({"text": f"{processor.image_token} {text}", "images": [image], "audio": []})
        elif kind == 2:
            clip = (rng.randn(4000) * 0.3).astype("float32")
            rows.append({"text": f"{processor.audio_token} {text}", "images": [], "audio": [clip]})
        else:
            rows.append({"text": text, "images": [], "audio": []})
    return rows  # every row has every key: datasets takes the columns from the first row


def load_rows(path: Path) -> list[dict[str, Any]]:
    import numpy as np
    from PIL import Image

    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            sys.exit(f"{path}:{n}: not valid JSON ({exc})")
        images = [Image.open(path.parent / p).convert("RGB") for p in row.get("images") or []]
        audio = [np.load(path.parent / p).astype("float32") for p in row.get("audio") or []]
        rows.append({"text": row["text"], "images": images, "audio": audio})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Gemma 4 model dir or hub id (default: build a tiny random one)")
    parser.add_argument("--data", type=Path, help="JSON Lines rows (default: built-in text/image/audio demo rows)")
    parser.add_argument("--out", type=Path, required=True, help="output dir; the adapter lands in OUT/adapter")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                        help="comma-separated PEFT target names; tower q/k/v/o_proj are included (default: %(default)s)")  # fmt: skip
    parser.add_argument("--exclude", help="regex of modules to leave out, e.g. '.*relative_k_proj' with all-linear for vLLM without the plugin")
    parser.add_argument("--bf16", action="store_true", help="load and train in bfloat16 (GPU)")
    parser.add_argument("--deepspeed", help="DeepSpeed config JSON (e.g. examples/zero3.json) when launched with deepspeed")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoProcessor, Gemma4ForConditionalGeneration
    from trl import SFTConfig

    from gemma4_bridge.train import Gemma4SFTTrainer, multimodal_collator

    model_path = args.model
    if model_path is None:
        from gemma4_bridge.testing.fixtures import build_tiny_gemma4

        model_path = str(build_tiny_gemma4(Path(tempfile.mkdtemp(prefix="gemma4-tiny-")) / "model"))
        print(f"built a tiny random Gemma 4 in {model_path}")
    processor = AutoProcessor.from_pretrained(model_path)
    on_gpu = torch.cuda.is_available()
    if args.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        import deepspeed  # on CPU (gloo) the process group must exist before SFTConfig sizes ZeRO-3

        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    config = SFTConfig(  # SFTConfig defaults otherwise: gradient checkpointing on, use_cache=False
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        bf16=args.bf16,
        use_cpu=not on_gpu,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        deepspeed=args.deepspeed,
        dataset_kwargs={"skip_prepare_dataset": True},  # the multimodal collator tokenizes
        remove_unused_columns=False,
    )
    # Load after SFTConfig: with a ZeRO-3 config, from_pretrained partitions the weights as it loads.
    model = Gemma4ForConditionalGeneration.from_pretrained(
        model_path, dtype=torch.bfloat16 if args.bf16 else torch.float32, attn_implementation="eager"
    )
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rows = load_rows(args.data) if args.data else demo_rows(processor, every_row_multimodal=distributed)
    trainer = Gemma4SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        data_collator=multimodal_collator(processor),
        peft_config=LoraConfig(
            r=args.r, lora_alpha=2 * args.r, target_modules=args.targets.split(","), exclude_modules=args.exclude
        ),
    )
    trainer.train()
    trainer.save_model(str(args.out / "adapter"))  # canonical, gathered under ZeRO-3; every rank calls it
    if trainer.is_world_process_zero():
        print(f"canonical adapter: {args.out / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
