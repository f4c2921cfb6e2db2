"""Tiny, seeded checkpoints of the other Gemma 4 family members, built locally (no hub).

Each builder keeps the real member's *structure* at toy sizes and switches on every feature that
breaks LoRA tooling:

- ``moe`` (26B-A4B-shaped): ``enable_moe_block`` (each layer keeps its dense MLP and adds a router
  and 3-D ``experts.gate_up_proj`` [E, 2*I, H] / ``experts.down_proj`` [E, H, I] parameters),
  ``attention_k_eq_v``, no per-layer embeddings, a vision tower with finite clip bounds, no audio.
- ``dense`` (31B-shaped): ``attention_k_eq_v``, no per-layer embeddings, vision tower, no audio.
- ``unified`` (12B Unified, ``Gemma4UnifiedForConditionalGeneration``): no towers; encoder-free
  embedders ``embed_vision.patch_dense`` and ``embed_vision.multimodal_embedder.embedding_projection``
  and ``embed_audio.embedding_projection`` (plain ``nn.Linear``, nothing to clamp), ``k_eq_v``.

The real 26B-A4B / 31B / 12B have no KV-shared layers; the fixtures keep two anyway (``kv_shared``)
because KV sharing is what breaks adapters most often, and tooling must handle it on any member --
except where the installed transformers cannot run KV-shared layers without per-layer inputs (5.24
slices ``per_layer_inputs`` for them without a None check; no released checkpoint has both), where
the MoE and dense fixtures follow the real members (see :func:`kv_sharing_runs_without_per_layer_inputs`).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from gemma4_bridge.testing.fixtures import (
    VOCAB_SIZE,
    TinySpec,
    _save_processor,
    build_tokenizer,
    multimodal_token_ids,
    save_perturbed,
    save_seeded_peft_adapter,
    tiny_config_dict,
)

Member = Literal["moe", "dense", "unified"]
# Expert sizes of the tiny MoE: 4 experts, 2 active per token, expert MLP width 16 (dense MLP: 96).
NUM_EXPERTS = 4
TOP_K_EXPERTS = 2
MOE_INTERMEDIATE_SIZE = 16
# Unified's encoder-free embedders: a 4x4 pixel patch merged 2x2 -> 8x8x3 = 192 raw values per
# soft token; audio soft tokens are raw waveform frames of AUDIO_EMBED_DIM samples.
UNIFIED_PATCH_SIZE = 4
UNIFIED_POOLING = 2
UNIFIED_MM_EMBED_DIM = 32
AUDIO_EMBED_DIM = 40
UNIFIED_SOFT_TOKENS = 70


@dataclass(frozen=True)
class FamilySpec:
    """Knobs of a tiny family member; defaults switch every structural feature on."""

    member: Member = "moe"
    seed: int = 0
    num_hidden_layers: int = 5
    kv_shared: bool = True  # two KV-shared layers (the real members have none; see the module docstring)
    vision: bool = True
    audio: bool = True  # Unified only: 26B-A4B and 31B have no audio
    finite_clip_bounds: bool = True
    dtype: str = "float32"

    @property
    def num_kv_shared_layers(self) -> int:
        runs = self.member == "unified" or kv_sharing_runs_without_per_layer_inputs()
        return 2 if self.kv_shared and runs else 0


@functools.cache
def kv_sharing_runs_without_per_layer_inputs() -> bool:
    """Whether the installed transformers forwards a Gemma 4 text model that has KV-shared layers but
    no per-layer inputs (5.19: yes; 5.24: TypeError in its KV-shared slicing). Probed once, ~0.1 s."""
    import torch
    from transformers import Gemma4TextConfig, Gemma4TextModel

    text = dict(tiny_config_dict(TinySpec(num_hidden_layers=3, num_kv_shared_layers=1))["text_config"])
    text.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB_SIZE)
    text.pop("model_type", None)
    with torch.random.fork_rng(devices=[]):  # a probe: the caller's seeded weights must not depend on it
        model = Gemma4TextModel(Gemma4TextConfig(**text)).eval()
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([[1, 2, 3]]))
        except TypeError:
            return False
    return True


def family_spec(member: Member, **changes: Any) -> FamilySpec:
    return replace(FamilySpec(member=member), **changes)


def _text_config(spec: FamilySpec) -> dict[str, Any]:
    """The E-series tiny text config, reshaped into the member's: no per-layer inputs, k_eq_v, MoE."""
    base = TinySpec(num_hidden_layers=spec.num_hidden_layers, num_kv_shared_layers=spec.num_kv_shared_layers)
    text = dict(tiny_config_dict(base)["text_config"])
    text.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB_SIZE, attention_k_eq_v=True)
    if spec.member == "moe":
        text.update(
            enable_moe_block=True,
            num_experts=NUM_EXPERTS,
            top_k_experts=TOP_K_EXPERTS,
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
        )
    return text


def family_config_dict(spec: FamilySpec) -> dict[str, Any]:
    """The member's config as a plain dict (before transformers fills defaults)."""
    if spec.member == "unified":
        return _unified_config_dict(spec)
    config = tiny_config_dict(TinySpec(vision=spec.vision, audio=False))
    config["text_config"] = _text_config(spec)
    return config


def _unified_config_dict(spec: FamilySpec) -> dict[str, Any]:
    text = _text_config(spec)
    for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
        text.pop(key)  # Gemma4UnifiedTextConfig has neither (strict config)
    config: dict[str, Any] = {
        "text_config": text,
        "vision_config": None,
        "audio_config": None,
        **multimodal_token_ids(),
    }
    if spec.vision:
        config["vision_config"] = {
            "patch_size": UNIFIED_PATCH_SIZE,
            "pooling_kernel_size": UNIFIED_POOLING,
            "mm_embed_dim": UNIFIED_MM_EMBED_DIM,
            "mm_posemb_size": 64,
            "output_proj_dims": UNIFIED_MM_EMBED_DIM,
            # Soft tokens per image: real checkpoints carry it and vLLM sizes image prompts from it;
            # equal to the processor's max_soft_tokens below (a size its image processor supports).
            "num_soft_tokens": UNIFIED_SOFT_TOKENS,
        }
    if spec.audio:
        config["audio_config"] = {"audio_embed_dim": AUDIO_EMBED_DIM}
    return config


def build_family_member(out_dir: str | os.PathLike[str], spec: FamilySpec) -> Path:
    """Write a real checkpoint of ``spec.member`` (weights, config, tokenizer, processor where one exists)."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = family_config_dict(spec)
    torch.manual_seed(spec.seed)  # after the config: nothing between the seed and the weights
    if spec.member == "unified":
        from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

        config = Gemma4UnifiedConfig(**config_dict)
        config.architectures = ["Gemma4UnifiedForConditionalGeneration"]
        model = Gemma4UnifiedForConditionalGeneration(config).eval()
    else:
        from transformers import Gemma4Config, Gemma4ForConditionalGeneration

        config = Gemma4Config(**{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")})
        config.architectures = ["Gemma4ForConditionalGeneration"]
        model = Gemma4ForConditionalGeneration(config).eval()
    save_perturbed(model, out, seed=spec.seed, finite_clip_bounds=spec.finite_clip_bounds, dtype=spec.dtype)
    tokenizer = build_tokenizer(out)
    if spec.member != "unified":
        _save_processor(out, tokenizer, TinySpec(vision=spec.vision, audio=False))
    else:
        _save_unified_processor(out, tokenizer)
    (out / "family_spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return out


def _save_unified_processor(out: Path, tokenizer: Any) -> None:
    """Unified's processor (raw patches, raw audio frames) so vLLM and HF processors load offline."""
    from transformers.models.gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
        Gemma4UnifiedImageProcessor,
        Gemma4UnifiedProcessor,
        Gemma4UnifiedVideoProcessor,
    )

    size = {"patch_size": UNIFIED_PATCH_SIZE, "pooling_kernel_size": UNIFIED_POOLING, "max_soft_tokens": UNIFIED_SOFT_TOKENS}
    processor = Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(feature_size=AUDIO_EMBED_DIM, audio_samples_per_token=AUDIO_EMBED_DIM),
        image_processor=Gemma4UnifiedImageProcessor(**size),
        video_processor=Gemma4UnifiedVideoProcessor(**size),
        tokenizer=tokenizer,
        image_seq_length=UNIFIED_SOFT_TOKENS,
        audio_seq_length=64,
    )
    processor.save_pretrained(out)


def load_family_model(model_dir: str | os.PathLike[str]) -> Any:
    """Load a family checkpoint in float32 with eager attention: bitwise-reproducible logits."""
    import torch

    config = json.loads(Path(model_dir, "config.json").read_text())
    if config.get("model_type") == "gemma4_unified":
        from transformers import Gemma4UnifiedForConditionalGeneration as cls
    else:
        from transformers import Gemma4ForConditionalGeneration as cls
    impl = {"text_config": "eager"}
    if config.get("model_type") != "gemma4_unified" and config.get("vision_config"):
        impl["vision_config"] = "eager"
    return cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=impl).eval()


# Language-model linears of every member (towers excluded: PEFT cannot wrap Gemma4ClippableLinear).
TEXT_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def write_family_adapter(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    target_modules: str | list[str] = TEXT_LINEARS,
    target_parameters: list[str] | None = None,
    r: int = 4,
    lora_alpha: int = 8,
    seed: int = 1,
    scale: float = 0.2,
    **lora_kwargs: Any,
) -> Path:
    """A real PEFT adapter (``target_parameters`` for experts) with seeded nonzero A and B."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, target_parameters=target_parameters, **lora_kwargs)
    return save_seeded_peft_adapter(get_peft_model(load_family_model(model_dir), config), out_dir, seed=seed, scale=scale)
