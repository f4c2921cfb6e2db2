"""Everything this package relies on inside SGLang, named in one place and version-checked.

The SGLang class hooks into SGLang internals that have no stable API. Each one is listed here
with what we assume about it; ``tests/sglang/test_upstream.py`` fails when the installed SGLang
changes one of them, and :func:`require_supported_sglang` refuses versions nobody has checked.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from gemma4_bridge.errors import BridgeError

# The SGLang releases whose internals (below) were read and tested. Widen only after re-running
# tests/sglang against the new release.
SUPPORTED_SGLANG_RANGE = ">=0.5.23,<0.5.24"
SUPPORTED_SGLANG = SpecifierSet(SUPPORTED_SGLANG_RANGE)

ARCH = "Gemma4ForConditionalGeneration"
UNIFIED_ARCH = "Gemma4UnifiedForConditionalGeneration"  # 12B Unified: a subclass of the built-in ARCH class
# The built-in classes we subclass, by architecture (SGLang matches processors and server checks by name).
UPSTREAM_MODELS = {
    ARCH: "sglang.srt.models.gemma4_mm:Gemma4ForConditionalGeneration",
    UNIFIED_ARCH: "sglang.srt.models.gemma4_unified:Gemma4UnifiedForConditionalGeneration",
}
UPSTREAM_MODEL = UPSTREAM_MODELS[ARCH]
# Model class resolution: we make sure our class is the registry's entry just before this runs.
RESOLVE_MODEL = "sglang.srt.model_loader.utils.get_model_architecture"
# Adapter loading from disk (--lora-paths, POST /load_lora_adapter): we read and normalise the
# adapter, then hand it to SGLang's own from-tensors path below.
LORA_MANAGER = "sglang.srt.lora.lora_manager:LoRAManager"
LOAD_ADAPTER = "_load_lora_adapter"  # (self, lora_ref) -> LoRAUpdateOutput
LOAD_ADAPTER_FROM_TENSORS = "_load_lora_adapter_from_tensors"  # (self, lora_ref, tensors, config_dict, added_tokens_config=None)
# LoRA buffer sizing of dense modules: SGLang reads the per-rank width from the base layer it
# finds by (leaf name, layer number) over all modules, first match wins. The vision tower's
# `encoder.layers.N.mlp.gate_up_proj/down_proj` come first, so text layers 0..N got the tower's
# MLP width. We seed its cache with language-model layers only before it scans.
LORA_MEMORY_POOL = "sglang.srt.lora.mem_pool:LoRAMemoryPool"
DENSE_LOCAL_DIM = "_dense_local_dim"  # (self, module_name, base_model, layer_idx, axis) -> int | None
DENSE_LINEARS_CACHE = "_dense_linears"  # {(leaf name, layer id): base layer}, built on first call
# Config parsing (12B Unified): SGLang's HF config parser re-reads every model_type found in this
# registry with the registry's class. 0.5.23 registers `gemma4_unified` as an alias of the tower
# model's Gemma4Config, so a Unified checkpoint's vision_config comes back a Gemma4VisionConfig
# without `model_patch_size` and SGLang's own Unified class cannot be built. We point that one entry
# at transformers' Gemma4UnifiedConfig (what the Unified class reads) from the plugin entry point,
# which every SGLang process runs before it parses the model's config.
CONFIG_REGISTRY = "sglang.srt.utils.hf_transformers.common:_CONFIG_REGISTRY"  # {model_type: config class}
UNIFIED_MODEL_TYPE = "gemma4_unified"
UNIFIED_CONFIG_ALIAS = "_Gemma4UnifiedConfigAlias"  # SGLang's entry for it (a Gemma4Config subclass), replaced
UNIFIED_CONFIG = "transformers:Gemma4UnifiedConfig"  # what replaces it


def sglang_version() -> Version | None:
    try:
        return Version(version("sglang"))
    except PackageNotFoundError:
        return None


def require_supported_sglang() -> Version:
    """The installed SGLang version, or a BridgeError naming the supported range."""
    found = sglang_version()
    if found is None:
        raise BridgeError(
            "gemma4-bridge's SGLang class was loaded but SGLang is not installed.",
            fix='install it with `pip install "gemma4-bridge[sglang]"`',
        )
    if found not in SUPPORTED_SGLANG:
        raise BridgeError(
            f"gemma4-bridge's SGLang class supports sglang {SUPPORTED_SGLANG_RANGE} (its hooks into SGLang "
            f"internals were checked against those releases only); found sglang {found}.",
            fix=f'install a supported release (`pip install "sglang{SUPPORTED_SGLANG_RANGE}"`) or a gemma4-bridge '
            "release that supports yours",
        )
    return found
