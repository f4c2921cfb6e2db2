"""SGLang model class for Gemma 4 LoRA, found through SGLang's plugin entry point.

Installing gemma4-bridge is enough: SGLang runs :func:`register` (entry point group
``sglang.srt.plugins``) in every process, before it parses the model's config. The documented
fallback is ``SGLANG_EXTERNAL_MODEL_PACKAGE=gemma4_bridge.plugins.sglang``, which makes SGLang's
registry read ``EntryClass`` from the ``gemma4_mm`` submodule; that import comes after the config
is parsed, too late to fix how SGLang parses the 12B Unified's (hook 4 in ``hooks.py``), so
Unified needs the entry point.

SGLang only logs errors raised while importing a plugin or an external model module, then serves
the built-in class: a broken install would silently serve adapters wrongly. So every failure here
is turned into a stand-in class of the same name whose construction raises the original error.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from gemma4_bridge import __version__
from gemma4_bridge.errors import BridgeError

from .upstream import ARCH, RESOLVE_MODEL, UPSTREAM_MODELS

logger = logging.getLogger(__name__)
_entry_classes: dict[str, type] = {}
# Why SGLang still parses 12B Unified configs with its Gemma4Config alias in this process, if it does
# (raised by the Unified class when it is built: the plugin loader only logs).
unified_config_error: BaseException | None = None


def register() -> None:
    """Entry point run by SGLang's plugin loader: hook model resolution and the Unified config parsing."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(RESOLVE_MODEL, use_bridge_class, HookType.BEFORE)
    install_unified_config()
    logger.info("gemma4-bridge %s SGLang plugin loaded: %s will be gemma4-bridge's", __version__, ", ".join(UPSTREAM_MODELS))


def install_unified_config() -> None:
    """Hook 4 (``hooks.use_unified_config``) now; a failure is kept for the Unified class to raise."""
    global unified_config_error
    try:
        from .hooks import use_unified_config

        use_unified_config()
    except Exception as exc:  # the message must reach the user, not only the log
        logger.error("gemma4-bridge: SGLang will parse 12B Unified configs with its Gemma4Config alias: %s", exc)
        unified_config_error = exc
    else:
        unified_config_error = None


def use_bridge_class(model_config: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook on SGLang's get_model_architecture: make our classes the Gemma 4 entries."""
    architectures = getattr(getattr(model_config, "hf_config", None), "architectures", None) or []
    for arch in UPSTREAM_MODELS:
        if arch in architectures:
            from sglang.srt.models.registry import ModelRegistry

            ModelRegistry.models[arch] = load_entry_class(arch)
    return None  # arguments unchanged


def load_entry_class(arch: str = ARCH) -> type:
    """Our model class for ``arch``, or (if it cannot be imported) a stand-in that fails loudly when built."""
    if arch not in _entry_classes:
        try:
            from .model import BRIDGE_CLASSES

            _entry_classes[arch] = BRIDGE_CLASSES[arch]
        except Exception as exc:  # the message must reach the user, not only the log
            logger.error("gemma4-bridge: the SGLang Gemma 4 class could not be loaded: %s", exc, exc_info=True)
            _entry_classes[arch] = failing_class(exc, arch)
    return _entry_classes[arch]


def failing_class(error: BaseException, arch: str = ARCH) -> type:
    """A class named like the built-in ``arch`` whose construction raises ``error`` with its traceback."""
    detail = "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        raise BridgeError(
            f"gemma4-bridge's SGLang Gemma 4 class failed to load, and serving with SGLang's built-in class "
            f"instead would silently serve LoRA adapters wrongly. The error was:\n{detail}\n",
            fix=getattr(error, "fix", None) or "fix the installation (pip install \"gemma4-bridge[sglang]\"), or "
            "uninstall gemma4-bridge to serve with SGLang's built-in class knowingly",
        )

    return type(arch, (), {"__init__": __init__, "__module__": __name__, "gemma4_bridge_import_error": detail})
