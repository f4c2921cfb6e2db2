"""vLLM model plugin for Gemma 4 LoRA, loaded through the ``vllm.general_plugins`` entry point."""

import logging

from gemma4_bridge import __version__

logger = logging.getLogger(__name__)


def register() -> None:
    """Entry point run by vLLM in every process (API server, engine core, workers)."""
    logger.info("gemma4-bridge %s vLLM plugin loaded", __version__)
