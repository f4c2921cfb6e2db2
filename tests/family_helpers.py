"""Helpers for the family tests: model inputs and logits (stock transformers / PEFT), and other
exporters' expert-LoRA forms, written from a PEFT adapter.

The splitting here reads PEFT's layout straight from peft 0.21's ParamWrapper.get_delta_weight
(lora_A.reshape(E, r, in), lora_B.reshape(out, r, E)); it never calls gemma4_bridge.converters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gemma4_bridge.testing.family import load_family_model



def text_and_image_inputs(model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A text prompt and an image prompt, through the member's own processor."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    return {
        "text": dict(processor(text=["the quick brown fox jumps over the lazy dog"], return_tensors="pt")),
        "image": dict(processor(text=[f"a picture {processor.image_token} of a cat"], images=[image], return_tensors="pt")),
    }


@torch.no_grad()
def logits(model, inputs) -> dict[str, torch.Tensor]:
    return {kind: model(**batch).logits.float() for kind, batch in inputs.items()}


def peft_logits(model_dir: Path, adapter: Path, inputs) -> dict[str, torch.Tensor]:
    """Stock PEFT's logits of ``adapter`` on the member in ``model_dir``."""
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(load_family_model(model_dir), adapter).eval(), inputs)


_PEFT_EXPERTS = re.compile(r"^(?P<module>.+\.experts)(?P<nest>(?:\.base_layer)?)\.(?P<part>lora_[AB])\.weight$")


def per_expert_form(src: Path, out: Path, num_experts: int, *, fused_gate_up: bool, experts: set[int] | None = None) -> Path:
    """Rewrite a PEFT target_parameters adapter as one 2-D LoRA per expert and projection.

    ``fused_gate_up``: ``experts.N.gate_up_proj``; else ``experts.N.gate_proj`` + ``up_proj``
    (same A, B split by rows: exactly the fused delta). ``experts``: keep only these experts.
    Assumes both parameters were targeted (gate_up nested under ``base_layer``).
    """
    tensors = load_file(src / "adapter_model.safetensors")
    new: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = _PEFT_EXPERTS.match(key)
        if m is None:
            new[key] = value
            continue
        if m.group("part") == "lora_B":
            continue
        a = value
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        param = "gate_up_proj" if m.group("nest") else "down_proj"
        a_e = a.reshape(num_experts, -1, a.shape[-1])
        b_e = b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)
        for e in range(num_experts):
            if experts is not None and e not in experts:
                continue
            prefix = f"{m.group('module')}.{e}"
            if param == "down_proj" or fused_gate_up:
                new[f"{prefix}.{param}.lora_A.weight"] = a_e[e].clone()
                new[f"{prefix}.{param}.lora_B.weight"] = b_e[e].clone()
            else:
                half = b_e.shape[1] // 2
                for name, rows in (("gate_proj", slice(0, half)), ("up_proj", slice(half, None))):
                    new[f"{prefix}.{name}.lora_A.weight"] = a_e[e].clone()
                    new[f"{prefix}.{name}.lora_B.weight"] = b_e[e][rows].clone()
    config = json.loads((src / "adapter_config.json").read_text())
    config.pop("target_parameters", None)
    config["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"]
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in new.items()}, out / "adapter_model.safetensors")
    return out
