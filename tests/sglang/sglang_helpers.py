"""Helpers for tests/sglang: build SGLang's Gemma 4 on CPU and start its LoRA manager."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TEXT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
MAX_LORA_RANK = 8


def build_sglang_model(server_args: Any, model_class: type) -> Any:
    """``model_class`` built from the checkpoint through SGLang's own ModelConfig, weights loaded."""
    from safetensors import safe_open
    from sglang.srt.configs.model_config import ModelConfig

    model_config = ModelConfig.from_server_args(server_args)
    model = model_class(config=model_config.hf_config, quant_config=None)

    def weights() -> Iterator[tuple[str, Any]]:
        for file in sorted(Path(server_args.model_path).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    yield key, f.get_tensor(key)

    model.load_weights(weights())
    return model.eval(), model_config


def lora_manager(
    model: Any, model_config: Any, server_args: Any, lora_paths: dict[str, Path], max_loras_per_batch: int | None = None
) -> Any:
    """SGLang's own LoRAManager over ``model`` with adapters loaded at start (--lora-paths)."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.lora.lora_manager import LoRAManager
    from sglang.srt.lora.lora_registry import LoRARef

    refs = [LoRARef(lora_name=name, lora_path=str(path), pinned=False) for name, path in lora_paths.items()]
    manager = LoRAManager(
        base_model=model,
        base_hf_config=model_config.hf_config,
        max_loras_per_batch=max_loras_per_batch or len(refs) + 1,
        load_config=LoadConfig(),
        dtype=torch.float32,
        server_args=server_args,
        lora_backend="torch_native",
        max_lora_rank=MAX_LORA_RANK,
        target_modules=None,
        lora_paths=refs,
    )
    return manager, {ref.lora_name: ref for ref in refs}
