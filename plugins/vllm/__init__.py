"""vLLM model plugin for Gemma 4 LoRA, loaded through the ``vllm.general_plugins`` entry point.

vLLM runs :func:`register` in every process it starts (API server, engine core, workers). It
overrides vLLM's ``Gemma4ForConditionalGeneration`` and ``Gemma4ForCausalLM`` with subclasses
(:mod:`.model`) and installs the narrow, version-checked LoRA hooks of :mod:`.hooks`, so that
``vllm serve <gemma-4> --enable-lora --lora-modules name=path`` serves any adapter flavour
``gemma4-bridge convert`` handles, with the numbers transformers + PEFT gives, or refuses it.
"""

from __future__ import annotations

import logging

from gemma4_bridge import __version__
from gemma4_bridge.errors import BridgeError

from .upstream import SUPPORTED_VLLM  # the releases whose internals were checked (upstream.py, per release)

ARCHITECTURES: dict[str, str] = {
    "Gemma4ForConditionalGeneration": "gemma4_bridge.plugins.vllm.model:BridgeGemma4ForConditionalGeneration",
    "Gemma4ForCausalLM": "gemma4_bridge.plugins.vllm.model:BridgeGemma4ForCausalLM",
    "Gemma4UnifiedForConditionalGeneration": "gemma4_bridge.plugins.vllm.model:BridgeGemma4UnifiedForConditionalGeneration",
}
# Architectures whose connectors (and towers, where they exist) take LoRA with --enable-tower-connector-lora.
MULTIMODAL_ARCHITECTURES = ("Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration")
_registered = False


def _logger() -> logging.Logger:
    # A child of vLLM's own logger, so the line appears with vLLM's format and level settings.
    from vllm.logger import init_logger

    return init_logger("vllm.gemma4_bridge")


def check_vllm_version(version: str) -> None:
    """Refuse vLLM releases the hooks were not verified against, before anything is patched."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        parsed = None
    base = Version(parsed.base_version) if parsed else None
    if base is None or base not in SpecifierSet(SUPPORTED_VLLM):
        raise BridgeError(
            f"gemma4-bridge {__version__} supports vLLM {SUPPORTED_VLLM}, but vLLM {version} is installed; "
            "its Gemma 4 LoRA internals are unverified, so the plugin refuses to guess.",
            fix=f"install a supported vLLM (pip install 'vllm{SUPPORTED_VLLM}'), upgrade gemma4-bridge, or "
            "disable the plugin with VLLM_PLUGINS set to a list without 'gemma4_bridge'",
        )


def register() -> None:
    """Entry point run by vLLM in every process: version check, model overrides, LoRA hooks."""
    global _registered
    if _registered:
        return
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    from . import hooks

    hooks.install()
    from .resolver import register_resolver

    register_resolver()
    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    _registered = True
    _logger().info(
        "gemma4-bridge %s vLLM plugin active (vLLM %s): %s overridden; Gemma 4 adapters are canonicalised "
        "in memory and checked at load",
        __version__,
        vllm.__version__,
        ", ".join(ARCHITECTURES),
    )
