"""Serve adapters by name from a folder: a vLLM LoRA resolver for every flavour the bridge handles.

With ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` and ``GEMMA4_BRIDGE_LORA_DIR=/adapters``, a request
for ``"model": "my-lora"`` that names no loaded adapter resolves ``/adapters/my-lora`` and loads it
on first use. Unlike vLLM's filesystem resolver (``VLLM_LORA_RESOLVER_CACHE_DIR``), it does not
require ``base_model_name_or_path`` to equal the served model's path: a hub id or another copy of
the same base is fine, because the planner checks the adapter against the served model's layout
instead (every flavour ``convert`` handles; refused ones get the bridge's message and fix). The
check runs in the API server (``hooks._resolve_lora``) before vLLM hands the directory to the
engine: 404 when there is no such adapter, 400 with the fix when it is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LORA_DIR_ENV = "GEMMA4_BRIDGE_LORA_DIR"
RESOLVER_NAME = "gemma4-bridge"


def adapter_dir(lora_name: str) -> Path | None:
    """``$GEMMA4_BRIDGE_LORA_DIR/<lora_name>`` if that is an adapter directory (plain names only)."""
    root = os.environ.get(LORA_DIR_ENV)
    if not root or not lora_name or lora_name in (".", "..") or "/" in lora_name or os.sep in lora_name:
        return None
    path = Path(root) / lora_name
    return path if (path / "adapter_config.json").is_file() else None


def make_resolver() -> Any:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class BridgeLoRAResolver(LoRAResolver):
        """Resolve a name to the folder's adapter of that name (checked by the planner in the front end)."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            path = adapter_dir(lora_name)
            if path is None:
                return None
            # vLLM replaces the id with its own counter before loading.
            return LoRARequest(lora_name=lora_name, lora_int_id=abs(hash(lora_name)) or 1, lora_path=str(path))

    return BridgeLoRAResolver()


def register_resolver() -> bool:
    """Register the resolver when ``GEMMA4_BRIDGE_LORA_DIR`` is set (as vLLM does for its own)."""
    if not os.environ.get(LORA_DIR_ENV):
        return False
    from vllm.lora.resolver import LoRAResolverRegistry

    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, make_resolver())
    return True
