"""SGLang's Gemma 4 models with LoRA that serves what transformers + PEFT compute.

Same names as the built-in classes (SGLang matches processors and server checks by name): the
multimodal Gemma 4 (E2B/E4B, 26B-A4B MoE, 31B) and the 12B Unified, whose built-in class subclasses
the multimodal one and so inherits its LoRA (language model only) and its LoRA sizing bugs.
Everything but LoRA sizing and adapter loading is inherited unchanged.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

from gemma4_bridge import __version__
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import Gemma4Layout
from gemma4_bridge.servers import MODEL_FILES, resolve_local_dir

from . import hooks
from .dims import lora_dims
from .upstream import require_supported_sglang

require_supported_sglang()

from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration as _BuiltinGemma4  # noqa: E402
from sglang.srt.models.gemma4_unified import Gemma4UnifiedForConditionalGeneration as _BuiltinUnified  # noqa: E402

logger = logging.getLogger(__name__)


class _BridgeLoRA:
    """What both Gemma 4 classes add to SGLang's: per-layer LoRA sizes, normalised adapter loading."""

    gemma4_bridge_version = __version__
    config: Any

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)  # type: ignore[call-arg]
        hooks.install_lora_hooks()
        logger.info(
            "gemma4-bridge %s: Gemma 4 SGLang class active (per-layer LoRA sizes, adapters normalised "
            "on load: regex targets, KV-shared/k_eq_v layers, rsLoRA/patterns; tower LoRA refused)",
            __version__,
        )

    @cached_property
    def gemma4_layout(self) -> Gemma4Layout:
        """The checkpoint's structure, from its config.json and safetensors headers."""
        return Gemma4Layout.from_model_dir(model_dir_of(self.config))

    def get_hidden_dim(self, module_name: str, layer_idx: int) -> tuple[int, int]:
        """(input, output) size of LoRA module ``module_name`` on ``layer_idx``, from the real weights."""
        require_kv_heads_per_rank(self.gemma4_layout)
        return lora_dims(self.gemma4_layout, module_name, layer_idx)


class Gemma4ForConditionalGeneration(_BridgeLoRA, _BuiltinGemma4):
    """Built-in SGLang Gemma 4 (E2B/E4B, 26B-A4B MoE, 31B) plus per-layer LoRA sizes and normalised adapter loading."""


class Gemma4UnifiedForConditionalGeneration(_BridgeLoRA, _BuiltinUnified):
    """Built-in SGLang 12B Unified plus the same: its LoRA is the language model's (embedder LoRA is
    refused by the SGLang class profile, naming merge)."""

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "") -> None:
        require_unified_config(config)
        super().__init__(config, quant_config=quant_config, prefix=prefix)


BRIDGE_CLASSES: dict[str, type] = {cls.__name__: cls for cls in (Gemma4ForConditionalGeneration, Gemma4UnifiedForConditionalGeneration)}


def require_unified_config(config: Any) -> None:
    """Refuse a Unified config SGLang parsed with its Gemma4Config alias (hook 4 not in place in this
    process): its vision config lacks the encoder-free embedder's sizes, so SGLang's class fails
    on a missing attribute instead of saying why."""
    from . import unified_config_error

    if isinstance(config, hooks.unified_config_class()):
        return
    vision = getattr(config, "vision_config", None)
    cause = f" gemma4-bridge could not fix SGLang's parsing: {unified_config_error}" if unified_config_error else ""
    raise BridgeError(
        f"SGLang parsed this 12B Unified checkpoint's config.json as {type(config).__name__} (vision config "
        f"{type(vision).__name__}), not transformers' Gemma4UnifiedConfig, so its Unified class cannot be built.{cause}",
        fix=getattr(unified_config_error, "fix", None)
        or "let SGLang load gemma4-bridge's plugin, which makes every SGLang process parse it right: it does by "
        "default; if SGLANG_PLUGINS is set, add gemma4_bridge to it (SGLANG_EXTERNAL_MODEL_PACKAGE alone is "
        "imported after the config is parsed)",
    )


def require_kv_heads_per_rank(layout: Gemma4Layout) -> None:
    """Refuse LoRA when tensor parallelism replicates K/V heads: SGLang then sizes every layer's
    per-rank qkv LoRA buffer from one head size and K/V head count, which Gemma 4 layers do not share."""
    from sglang.srt.runtime_context import get_parallel

    tp = get_parallel().attn_tp_size
    fewest = min(layer.num_kv_heads for layer in layout.text_layers)
    if tp > fewest:
        raise BridgeError(
            f"gemma4-bridge: LoRA on Gemma 4 with attention tensor parallelism {tp} > {fewest} K/V head(s) is not "
            "supported: SGLang would size the per-rank q/k/v LoRA buffers of some layers wrongly.",
            fix=f"serve LoRA with --tp-size {fewest} (or 1) and scale out with --dp-size instead",
        )


def model_dir_of(config: Any) -> Path:
    """The local directory the model was loaded from (``config.name_or_path``, or its hub cache)."""
    name = str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", ""))
    try:
        return resolve_local_dir(name, "config.json", MODEL_FILES)
    except LookupError as exc:
        raise BridgeError(
            f"gemma4-bridge could not find the Gemma 4 checkpoint SGLang loaded ({name or '?'}): {exc}.",
            fix="pass --model-path a local model directory, or download the model first (huggingface-cli download)",
        ) from exc
