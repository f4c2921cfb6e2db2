"""Helpers for tests/sglang: build SGLang's Gemma 4 on CPU and start its LoRA manager."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

MAX_LORA_RANK = 8


def build_sglang_model(server_args: Any, model_class: type) -> Any:
    """``model_class`` built from the checkpoint through SGLang's own ModelConfig, weights loaded."""
    from safetensors import safe_open
    from sglang.srt.configs.model_config import ModelConfig

    model_config = ModelConfig.from_server_args(server_args)
    model = model_class(config=model_config.hf_config, quant_config=None)

    def weights() -> Iterator[tuple[str, Any]]:
        for file in sorted(Path(server_args.model_path).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    yield key, f.get_tensor(key)

    model.load_weights(weights())
    return model.eval(), model_config


def lora_manager(
    model: Any, model_config: Any, server_args: Any, lora_paths: dict[str, Path], max_loras_per_batch: int | None = None
) -> Any:
    """SGLang's own LoRAManager over ``model`` with adapters loaded at start (--lora-paths)."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.lora.lora_manager import LoRAManager
    from sglang.srt.lora.lora_registry import LoRARef

    refs = [LoRARef(lora_name=name, lora_path=str(path), pinned=False) for name, path in lora_paths.items()]
    manager = LoRAManager(
        base_model=model,
        base_hf_config=model_config.hf_config,
        max_loras_per_batch=max_loras_per_batch or len(refs) + 1,
        load_config=LoadConfig(),
        dtype=torch.float32,
        server_args=server_args,
        lora_backend="torch_native",
        max_lora_rank=MAX_LORA_RANK,
        target_modules=None,
        lora_paths=refs,
    )
    return manager, {ref.lora_name: ref for ref in refs}


LORA_SLICES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"), "o_proj": ("o_proj",), "down_proj": ("down_proj",)}
LORA_PARENT = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}


def lora_buffer_deltas(manager: Any, model: Any, uid: str) -> dict[tuple[int, str], torch.Tensor]:
    """``scaling * B @ A`` per (text layer, q/k/v/o/gate/up/down slice) of adapter ``uid``, read out of
    SGLang's LoRA buffers as its kernels slice them."""
    pool, adapter = manager.memory_pool, manager.loras[uid]
    slot, rank = pool.uid_to_buffer_id[uid], manager.configs[uid].r
    out = {}
    for module, leaves in LORA_SLICES.items():
        for layer, sg_layer in enumerate(model.language_model.layers):
            base = getattr(getattr(sg_layer, LORA_PARENT[module]), module).base_layer
            widths = getattr(base, "output_partition_sizes", None) or [base.output_size]
            offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]
            a_buf, b_buf = pool.A_buffer[module][layer][slot], pool.B_buffer[module][layer][slot]
            for i, leaf in enumerate(leaves):
                a = a_buf[i * rank : (i + 1) * rank].double()
                b = b_buf[offsets[i] : offsets[i + 1], :rank].double()
                out[(layer, leaf)] = adapter.scaling * b @ a
    return out


# SGLANG_EXTERNAL_MODEL_PACKAGE is read when SGLang's registry is first imported: a fresh interpreter.
_EXTERNAL_KEY = pytest.StashKey[subprocess.Popen]()
EXTERNAL_ROUTE = r"""
import json, logging, sys
logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
from sglang.srt.plugins import load_plugins
load_plugins()  # our entry point is excluded by SGLANG_PLUGINS: only the env var route is left
from sglang.srt.models.registry import ModelRegistry, import_model_classes

def describe(cls):
    from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration as Builtin
    out = {"module": cls.__module__, "name": cls.__name__, "subclass_of_builtin": issubclass(cls, Builtin)}
    if not out["subclass_of_builtin"]:
        try:
            cls(None)
        except Exception as exc:
            out["construct_error"] = f"{type(exc).__name__}: {exc}"
    return out

report = {"ok": describe(ModelRegistry.resolve_model_cls(["Gemma4ForConditionalGeneration"])[0])}
# Without the entry point, nothing changes how SGLang parses 12B Unified configs (hook 4).
from sglang.srt.utils.hf_transformers.common import _CONFIG_REGISTRY
report["unified_config"] = _CONFIG_REGISTRY["gemma4_unified"].__name__
# A broken install: an import error inside the package, then SGLang's own registry scan again.
import gemma4_bridge.plugins.sglang as pkg
pkg._entry_classes.clear()
for name in ("gemma4_bridge.plugins.sglang.model", "gemma4_bridge.plugins.sglang.gemma4_mm"):
    sys.modules.pop(name, None)
sys.modules["gemma4_bridge.plugins.sglang.model"] = None
ModelRegistry.models.update(import_model_classes.__wrapped__("gemma4_bridge.plugins.sglang"))
report["broken"] = describe(ModelRegistry.resolve_model_cls(["Gemma4ForConditionalGeneration"])[0])
print("REPORT" + json.dumps(report))
"""


EXTERNAL_ROUTE_TEST = "test_external_model_package_resolves_our_class"


def external_route_process(config: Any) -> subprocess.Popen[str]:
    """The fallback-route check, started once per session (early, see conftest.py)."""
    proc = config.stash.get(_EXTERNAL_KEY, None)
    if proc is None:
        proc = config.stash[_EXTERNAL_KEY] = _start_external_route()
    return proc


def _start_external_route() -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SGLANG_EXTERNAL_MODEL_PACKAGE": "gemma4_bridge.plugins.sglang",
        "SGLANG_PLUGINS": "only-a-plugin-that-does-not-exist",
    }
    return subprocess.Popen([sys.executable, "-c", EXTERNAL_ROUTE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
