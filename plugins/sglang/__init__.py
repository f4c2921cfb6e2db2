"""SGLang model class for Gemma 4 LoRA (``SGLANG_EXTERNAL_MODEL_PACKAGE=gemma4_bridge.plugins.sglang``)."""

import logging

from gemma4_bridge import __version__

logger = logging.getLogger(__name__)


def register() -> None:
    """Entry point run by SGLang's plugin loader."""
    logger.info("gemma4-bridge %s SGLang plugin loaded", __version__)
