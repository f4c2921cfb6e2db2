"""SGLang model class for Gemma 4 LoRA, found through SGLang's plugin entry point.

Installing gemma4-bridge is enough: SGLang runs :func:`register` (entry point group
``sglang.srt.plugins``) in every process. The documented fallback is
``SGLANG_EXTERNAL_MODEL_PACKAGE=gemma4_bridge.plugins.sglang``, which makes SGLang's registry read
``EntryClass`` from the ``gemma4_mm`` submodule.

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


def register() -> None:
    """Entry point run by SGLang's plugin loader: hook model resolution (cheap: imports nothing heavy)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(RESOLVE_MODEL, use_bridge_class, HookType.BEFORE)
    logger.info("gemma4-bridge %s SGLang plugin loaded: %s will be gemma4-bridge's", __version__, ", ".join(UPSTREAM_MODELS))


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
