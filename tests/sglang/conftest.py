"""SGLang test environment: a real SGLang Gemma 4 model and LoRA manager, built on CPU.

These tests run in .venv-sglang (scripts/env-sglang.sh), never in the main venv: SGLang 0.5.23
pins the CUDA torch 2.14.1. Its server cannot start without a GPU, but its model classes, model
registry, plugin loader, LoRA manager, memory pool and adapter loader are plain Python + torch.

What is mocked, and why (GPU-only facilities, nothing that decides shapes or values):
* RoPE kernel selection: off CUDA, SGLang's RotaryEmbedding imports a CUDA kernel module
  (``vllm._custom_ops``) at construction; we tell it it is on CPU, so it keeps its torch path.
* Pinned host memory (``pin_memory=True`` / ``Tensor.pin_memory()`` in the LoRA layers): it needs
  a CUDA driver; on CPU the same tensors unpinned are equivalent.
The LoRA kernels are never called here except SGLang's ``torch_native`` backend, pure torch.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sglang = pytest.importorskip("sglang", reason="tests/sglang run in .venv-sglang (scripts/test does that)")

import torch  # noqa: E402

from gemma4_bridge.fixtures import build_tiny_gemma4, variant, write_peft_adapter  # noqa: E402
from sglang_helpers import MAX_LORA_RANK, TEXT_TARGETS, build_sglang_model  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # SGLang's CUDA-side dependencies warn about deprecations on import; not ours to act on.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore::UserWarning")


@pytest.fixture(scope="session")
def sg_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every Gemma 4 layer kind at once: sliding (head 32) / full (head 64), KV-shared layers 3-4,
    k_eq_v on full layers, and use_double_wide_mlp (layers 3-4 get a 192-wide MLP); vision + audio."""
    return build_tiny_gemma4(tmp_path_factory.mktemp("sg") / "model", variant(double_wide_mlp=True))


@pytest.fixture(scope="session")
def sg_adapters(sg_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real PEFT adapters for the model, one per PEFT-side flavour."""
    root = tmp_path_factory.mktemp("sg_adapters")
    return {
        "text": write_peft_adapter(sg_model_dir, root / "text", target_modules=TEXT_TARGETS, seed=2),
        # PEFT's own default for gemma4 (q and v only): SGLang needs zero K, and V is absent on k_eq_v layers.
        "qv": write_peft_adapter(sg_model_dir, root / "qv", target_modules=r".*language_model\..*\.(q_proj|v_proj)", seed=3),
        # Per-module scaling SGLang ignores: rsLoRA, rank_pattern, alpha_pattern.
        "rslora_patterns": write_peft_adapter(
            sg_model_dir, root / "rslora", target_modules=TEXT_TARGETS, seed=4, r=4, lora_alpha=8, use_rslora=True,
            rank_pattern={"o_proj": 2, "layers.1.mlp.down_proj": 8}, alpha_pattern={"gate_proj": 3},
        ),  # fmt: skip
        "all_linear": write_peft_adapter(sg_model_dir, root / "all_linear", seed=5),
    }


class _HostOnlyTorch(types.ModuleType):
    """``torch`` for SGLang's LoRA layer module with pinned host memory turned into plain memory."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def tensor(*args: Any, pin_memory: bool = False, **kwargs: Any) -> Any:
        return torch.tensor(*args, **kwargs)

    @staticmethod
    def zeros(*args: Any, pin_memory: bool = False, **kwargs: Any) -> Any:
        return torch.zeros(*args, **kwargs)


@pytest.fixture(scope="session")
def sglang_cpu(sg_model_dir: Path) -> Iterator[Any]:
    """SGLang's runtime context published for one CPU rank, with the GPU-only facilities mocked."""
    import sglang.srt.layers.rotary_embedding.base as rope
    import sglang.srt.lora.backend.torch_backend as torch_backend
    import sglang.srt.lora.layers as lora_layers
    from sglang.srt.runtime_context import get_parallel, reset_context
    from sglang.srt.server_args import ServerArgs
    from sglang.test.parallel_groups import publish

    mp = pytest.MonkeyPatch()
    mp.setattr(rope, "_is_cpu", True)  # mock: keep the torch RoPE path (no CUDA kernel import)
    mp.setattr(lora_layers, "torch", _HostOnlyTorch("torch"))  # mock: no pinned memory without a driver
    mp.setattr(torch_backend, "torch", _HostOnlyTorch("torch"))
    mp.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    server_args = ServerArgs(
        model_path=str(sg_model_dir), device="cpu", enable_lora=True, max_lora_rank=MAX_LORA_RANK, lora_backend="torch_native"
    )
    publish(server_args, role="test")
    one_stage = types.SimpleNamespace(is_first_rank=True, is_last_rank=True, world_size=1, rank_in_group=0)
    get_parallel().override_permanently(pp_group=one_stage)
    try:
        yield server_args
    finally:
        reset_context()
        mp.undo()


@pytest.fixture(scope="session")
def sg_model(sglang_cpu: Any) -> tuple[Any, Any]:
    """gemma4-bridge's SGLang class, as SGLang's registry resolves it, built on CPU."""
    from gemma4_bridge.plugins.sglang import load_entry_class

    return build_sglang_model(sglang_cpu, load_entry_class())

