"""The four places where gemma4-bridge changes SGLang's behaviour, each narrow and named.

1. Model class resolution (:data:`upstream.RESOLVE_MODEL`): just before SGLang resolves a
   checkpoint's architecture, our class becomes the registry's ``Gemma4ForConditionalGeneration``
   (``use_bridge_class`` in ``__init__.py``, installed through SGLang's plugin HookRegistry).
2. Adapter loading (:data:`upstream.LOAD_ADAPTER`, :data:`upstream.LOAD_ADAPTER_FROM_TENSORS`):
   for our model only, the adapter is normalised in memory (see ``adapter.py``) and handed to
   SGLang's own from-tensors loader.
3. LoRA buffer sizing of dense modules (:data:`upstream.DENSE_LOCAL_DIM`): for our model only,
   SGLang looks up text-layer base modules among the language model's layers, not the towers'.

4. Config parsing of the 12B Unified (:data:`upstream.CONFIG_REGISTRY`): SGLang's registry entry
   for ``gemma4_unified`` (an alias of the tower model's Gemma4Config) becomes transformers'
   Gemma4UnifiedConfig (:func:`use_unified_config`).

Hooks 2 and 3 are installed by our model class when SGLang builds it (so they work with either
registration route) and leave every other model untouched. Hook 4 must act before SGLang parses
the model's config, long before a model class is built: the plugin entry point installs it (every
SGLang process runs it first); the Unified class refuses a config parsed without it.
"""

from __future__ import annotations

import functools
import logging
import pkgutil
from pathlib import Path
from typing import Any

from gemma4_bridge.errors import BridgeError
from gemma4_bridge.servers import resolve_local_dir

from .adapter import SGLangAdapter, prepare_adapter
from .upstream import (
    CONFIG_REGISTRY,
    DENSE_LINEARS_CACHE,
    DENSE_LOCAL_DIM,
    LOAD_ADAPTER,
    LOAD_ADAPTER_FROM_TENSORS,
    LORA_MANAGER,
    LORA_MEMORY_POOL,
    UNIFIED_CONFIG,
    UNIFIED_CONFIG_ALIAS,
    UNIFIED_MODEL_TYPE,
    require_supported_sglang,
)

logger = logging.getLogger(__name__)
_lora_hooks_installed = False


def install_lora_hooks() -> None:
    """Install hooks 2 and 3 (see the module docstring); idempotent."""
    global _lora_hooks_installed
    if _lora_hooks_installed:
        return
    require_supported_sglang()
    _hook_adapter_loading()
    _hook_dense_module_lookup()
    _lora_hooks_installed = True


def _hook_adapter_loading() -> None:
    manager_class = pkgutil.resolve_name(LORA_MANAGER)
    load_from_tensors = getattr(manager_class, LOAD_ADAPTER_FROM_TENSORS)
    load_from_disk = getattr(manager_class, LOAD_ADAPTER)

    @functools.wraps(load_from_disk)
    def _load_lora_adapter(self: Any, lora_ref: Any) -> Any:
        if not _is_bridge_model(self.base_model):
            return load_from_disk(self, lora_ref)
        try:
            adapter_dir = resolve_adapter_dir(lora_ref.lora_path)
            prepared = prepare_adapter(adapter_dir, self.base_model.gemma4_layout)
            added_tokens = _added_tokens_config(adapter_dir)
        except BridgeError as err:
            return _refused(self, lora_ref, err)
        _log_prepared(lora_ref, prepared)
        return load_from_tensors(self, lora_ref, prepared.tensors, prepared.config, added_tokens)

    @functools.wraps(load_from_tensors)
    def _load_lora_adapter_from_tensors(
        self: Any, lora_ref: Any, tensors: Any, config_dict: Any, added_tokens_config: Any = None
    ) -> Any:
        if not _is_bridge_model(self.base_model):
            return load_from_tensors(self, lora_ref, tensors, config_dict, added_tokens_config)
        try:
            prepared = prepare_adapter((config_dict, tensors), self.base_model.gemma4_layout)
        except BridgeError as err:
            return _refused(self, lora_ref, err)
        _log_prepared(lora_ref, prepared)
        return load_from_tensors(self, lora_ref, prepared.tensors, prepared.config, added_tokens_config)

    setattr(manager_class, LOAD_ADAPTER, _load_lora_adapter)
    setattr(manager_class, LOAD_ADAPTER_FROM_TENSORS, _load_lora_adapter_from_tensors)
    logger.info("gemma4-bridge: SGLang adapter loading hooked for Gemma 4 (%s.%s/%s)", LORA_MANAGER, LOAD_ADAPTER, LOAD_ADAPTER_FROM_TENSORS)


def _hook_dense_module_lookup() -> None:
    pool_class = pkgutil.resolve_name(LORA_MEMORY_POOL)
    dense_local_dim = getattr(pool_class, DENSE_LOCAL_DIM)

    @functools.wraps(dense_local_dim)
    def _dense_local_dim(self: Any, module_name: str, base_model: Any, layer_idx: int, axis: str) -> Any:
        if _is_bridge_model(base_model) and getattr(self, DENSE_LINEARS_CACHE, None) is None:
            setattr(self, DENSE_LINEARS_CACHE, text_layer_linears(base_model))
        return dense_local_dim(self, module_name, base_model, layer_idx, axis)

    setattr(pool_class, DENSE_LOCAL_DIM, _dense_local_dim)


def use_unified_config() -> None:
    """Hook 4: SGLang parses ``gemma4_unified`` configs with transformers' Gemma4UnifiedConfig; idempotent.

    Only SGLang's known alias is replaced: any other entry means SGLang changed it, so this
    raises (with the entry) instead of guessing. No entry at all is fine: SGLang then keeps what
    transformers' AutoConfig parsed, the Unified config.
    """
    require_supported_sglang()
    registry = pkgutil.resolve_name(CONFIG_REGISTRY)
    unified = unified_config_class()
    current = registry.get(UNIFIED_MODEL_TYPE)
    if current is None or current is unified:
        return
    if getattr(current, "__name__", None) != UNIFIED_CONFIG_ALIAS:
        raise BridgeError(
            f"SGLang's config registry ({CONFIG_REGISTRY}) maps '{UNIFIED_MODEL_TYPE}' to {current!r}, not the "
            f"{UNIFIED_CONFIG_ALIAS} gemma4-bridge was checked against; it was left alone.",
            fix="use a gemma4-bridge release that supports the installed SGLang",
        )
    registry[UNIFIED_MODEL_TYPE] = unified
    logger.info(
        "gemma4-bridge: SGLang parses '%s' configs with transformers' %s (was SGLang's %s, which drops "
        "the Unified vision/audio configs)", UNIFIED_MODEL_TYPE, unified.__name__, UNIFIED_CONFIG_ALIAS,
    )


def unified_config_class() -> type:
    """transformers' Gemma4UnifiedConfig, or a BridgeError naming the transformers release."""
    try:
        return pkgutil.resolve_name(UNIFIED_CONFIG)
    except (ImportError, AttributeError) as exc:
        from transformers import __version__ as found

        raise BridgeError(
            f"transformers {found} has no Gemma4UnifiedConfig, so SGLang cannot parse a 12B Unified checkpoint's config.",
            fix="install the transformers SGLang pins (5.19.0 for SGLang 0.5.23) or newer",
        ) from exc


def text_layer_linears(base_model: Any) -> dict[tuple[str, int], Any]:
    """{(leaf name, layer id): base layer} over the language model's layers only (SGLang's cache format)."""
    from sglang.srt.layers.utils import get_layer_id
    from sglang.srt.lora.layers import unwrap_lora_layer

    linears: dict[tuple[str, int], Any] = {}
    for name, module in base_model.named_modules():
        if not base_model.should_apply_lora(name):
            continue  # vision/audio tower layers reuse the names and numbers of text layers
        layer_id = get_layer_id(name)
        base_layer = unwrap_lora_layer(module)
        if layer_id is not None and (
            hasattr(base_layer, "input_size_per_partition") or hasattr(base_layer, "output_partition_sizes")
        ):
            linears.setdefault((name.rsplit(".", 1)[-1], layer_id), base_layer)
    return linears


def resolve_adapter_dir(lora_path: str) -> Path:
    """A local adapter directory, or the hub snapshot SGLang itself would download."""
    try:
        return resolve_local_dir(lora_path, None, ("*.json", "*.safetensors", "*.bin"), download=True)
    except LookupError as exc:
        raise BridgeError(
            f"{lora_path}: not a local adapter directory, and fetching it failed ({exc}).",
            fix="pass the directory PEFT's save_pretrained wrote",
        ) from exc


def _is_bridge_model(model: Any) -> bool:
    return getattr(type(model), "gemma4_bridge_version", None) is not None


def _added_tokens_config(adapter_dir: Path) -> Any:
    """Read as SGLang reads it (``added_tokens.json``), so its own vocabulary check still applies."""
    from sglang.srt.lora.lora_config import LoRAConfig

    return LoRAConfig(str(adapter_dir)).added_tokens_config


def _refused(manager: Any, lora_ref: Any, err: BridgeError) -> Any:
    logger.error("gemma4-bridge refused LoRA adapter '%s' (%s): %s", lora_ref.lora_name, lora_ref.lora_path, err)
    return manager.create_lora_update_result(success=False, error_message=f"gemma4-bridge: {err}")


def _log_prepared(lora_ref: Any, prepared: SGLangAdapter) -> None:
    level = logging.WARNING if prepared.dropped else logging.INFO
    logger.log(level, "gemma4-bridge: LoRA adapter '%s' (%s): %s", lora_ref.lora_name, prepared.source, prepared.summary())
