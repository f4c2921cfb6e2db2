"""Helpers for the converter tests: adapter variants, independent delta references, model inputs.

The references here never call gemma4_bridge.converters: deltas come from PEFT's own loaded
modules or from scaling * B @ A computed with this file's reading of the config.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "base_model.model."


def write_variant(
    src: Path,
    out: Path,
    *,
    rename: Callable[[str], str] | None = None,
    config_update: dict[str, Any] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    as_pickle: bool = False,
) -> Path:
    """Copy a PEFT adapter, rewriting key names / config / values the way some tool saved them."""
    tensors = load_file(src / "adapter_model.safetensors")
    new: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        value = transform(key, value) if transform else value
        new[rename(key) if rename else key] = value.contiguous()
    new.update(extra or {})
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(config_update or {})
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    if as_pickle:
        torch.save(new, out / "adapter_model.bin")
    else:
        save_file(new, out / "adapter_model.safetensors")
    return out


def drop_tower_linear(key: str) -> str:
    """A custom clippable LoRA layer wraps Gemma4ClippableLinear itself: keys lack '.linear'."""
    return re.sub(r"\.linear\.(lora_[AB])", r".\1", key) if "_tower." in key else key


def default_adapter_name(key: str) -> str:
    return re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", key)


def no_prefix(key: str) -> str:
    return key.removeprefix(PREFIX)


def _match(pattern: dict[str, Any], module: str) -> Any:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def file_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """{module path: scaling * B @ A} from a canonical adapter's files (this test's own reading)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = _match(config.get("rank_pattern") or {}, module) or config["r"]
        alpha = _match(config.get("alpha_pattern") or {}, module) or config["lora_alpha"]
        assert a.shape[0] == r, (module, a.shape, r)
        scaling = alpha / (r**0.5) if config.get("use_rslora") else alpha / r
        out[module] = scaling * (b.double() @ a.double())
    return out


def randomize_lora(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Seeded random values for every LoRA factor of a live PEFT model (PEFT starts B at zero: no delta)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def lora_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module path: scaling * B @ A} of a live PEFT model's default adapter, computed here (float32)."""
    return {
        name.removeprefix(PREFIX): module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight)
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def base_plus(model_dir: Path, deltas: dict[str, torch.Tensor]) -> Any:
    """A fresh base model with W += delta on each module: the independent reference for LoRA logits."""
    from gemma4_bridge.testing.fixtures import load_tiny_model

    model = load_tiny_model(model_dir)
    with torch.no_grad():
        for path, delta in deltas.items():
            model.get_submodule(path).weight += delta
    return model


def peft_deltas(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """{module path: delta} as PEFT itself computes it after loading ``adapter`` (rsLoRA and patterns included)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from gemma4_bridge.testing.fixtures import load_tiny_model

    model = PeftModel.from_pretrained(load_tiny_model(model_dir), adapter)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out[name.removeprefix(PREFIX)] = module.get_delta_weight("default").double()
    return out


def mm_inputs(model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Text, image and audio inputs built by the model's own saved Gemma4Processor."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
    audio = (rng.randn(16000) * 0.1).astype("float32")
    return {
        "text": dict(processor(text=["the quick brown fox jumps over the lazy dog"], return_tensors="pt")),
        "image": dict(processor(text=[f"a picture {processor.image_token} of a cat"], images=[image], return_tensors="pt")),
        "audio": dict(processor(text=[f"a sound {processor.audio_token} of rain"], audio=[audio], return_tensors="pt")),
    }


@torch.no_grad()
def all_logits(model: Any, inputs: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {kind: model(**batch).logits.float() for kind, batch in inputs.items()}


def dir_digest(path: Path) -> dict[str, str]:
    """Content hash of every file under ``path``: proves an input was not modified."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
