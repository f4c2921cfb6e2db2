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

import logging
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
_NO_SGLANG: str | None = None
try:
    import sglang.srt  # noqa: F401  (plain `sglang` would also find this directory, a namespace package)
except ImportError as exc:  # the main venv: scripts/test runs this directory in .venv-sglang instead
    _NO_SGLANG = f"SGLang is not importable here ({exc}); these tests run in .venv-sglang: scripts/test tests/sglang"

if _NO_SGLANG is not None:
    # Each test module (which imports SGLang at the top) becomes one item that reports as skipped
    # with the reason, instead of the directory vanishing from the run.

    class _WithoutSGLang(pytest.File):
        def collect(self) -> Iterator[pytest.Item]:
            yield _SkippedWithoutSGLang.from_parent(self, name=self.path.name)

    class _SkippedWithoutSGLang(pytest.Item):
        def setup(self) -> None:
            pytest.skip(_NO_SGLANG)

        def runtest(self) -> None:  # never reached: setup skips
            raise AssertionError("unreachable")

        def reportinfo(self) -> tuple[Path, int, str]:
            return self.path, 0, self.name

    def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.File:
        return _WithoutSGLang.from_parent(parent, path=module_path)


import torch  # noqa: E402

from gemma4_bridge.testing.family import TEXT_LINEARS  # noqa: E402
from gemma4_bridge.testing.fixtures import build_tiny_gemma4, variant, write_peft_adapter  # noqa: E402
from convert_helpers import default_adapter_name, write_variant  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from sglang_helpers import (  # noqa: E402
    _EXTERNAL_KEY,
    EXTERNAL_ROUTE_TEST,
    MAX_LORA_RANK,
    build_sglang_model,
    external_route_process,
    lora_manager,
)

LM = "base_model.model.model.language_model."


def pytest_configure(config: pytest.Config) -> None:
    # SGLang's CUDA-side dependencies warn about deprecations on import; not ours to act on.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore::UserWarning")


def pytest_collection_finish(session: pytest.Session) -> None:
    # The fallback-route check needs a fresh interpreter (~40 s of imports): start it now, in parallel.
    if any(EXTERNAL_ROUTE_TEST in item.nodeid for item in session.items):
        external_route_process(session.config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    proc = session.config.stash.get(_EXTERNAL_KEY, None)
    if proc is not None and proc.poll() is None:
        proc.kill()  # e.g. -x stopped the run before the test that reads it
        proc.communicate()


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
        "text": write_peft_adapter(sg_model_dir, root / "text", target_modules=TEXT_LINEARS, seed=2),
        # PEFT's own default for gemma4 (q and v only): SGLang needs zero K, and V is absent on k_eq_v layers.
        "qv": write_peft_adapter(sg_model_dir, root / "qv", target_modules=r".*language_model\..*\.(q_proj|v_proj)", seed=3),
        # Per-module scaling SGLang ignores: rsLoRA, rank_pattern, alpha_pattern.
        "rslora_patterns": write_peft_adapter(
            sg_model_dir, root / "rslora", target_modules=TEXT_LINEARS, seed=4, r=4, lora_alpha=8, use_rslora=True,
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


def _kv_extras(src: Path) -> dict[str, torch.Tensor]:
    """k/v LoRA on KV-shared layers 3-4 (8 tensors), as training on transformers 5.5.0/5.5.1 saved it."""
    a = load_file(src / "adapter_model.safetensors")[f"{LM}layers.0.self_attn.k_proj.lora_A.weight"]
    g = torch.Generator().manual_seed(7)
    out = {}
    for layer, width in ((3, 32), (4, 64)):
        for leaf in ("k_proj", "v_proj"):
            out[f"{LM}layers.{layer}.self_attn.{leaf}.lora_A.weight"] = torch.randn(a.shape, generator=g)
            out[f"{LM}layers.{layer}.self_attn.{leaf}.lora_B.weight"] = torch.randn(width, a.shape[0], generator=g)
    return out


@pytest.fixture(scope="session")
def flavours(sg_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{name: (adapter dir, the PEFT adapter whose deltas it must serve)}."""
    root, text = tmp_path_factory.mktemp("flavours"), sg_adapters["text"]
    return {
        "regex_targets": (text, text),
        "peft_default_qv": (sg_adapters["qv"], sg_adapters["qv"]),
        "rslora_patterns": (sg_adapters["rslora_patterns"], sg_adapters["rslora_patterns"]),
        "default_in_keys": (write_variant(text, root / "default", rename=default_adapter_name), text),
        "vllm_names": (write_variant(text, root / "vllm", rename=lambda k: k.replace(LM, "base_model.model.language_model.model.")), text),
        "causal_lm_names": (write_variant(text, root / "causal", rename=lambda k: k.replace(LM, "base_model.model.model.")), text),
        "kv_shared_extras": (write_variant(text, root / "kv_extras", extra=_kv_extras(text)), text),
    }


@pytest.fixture(scope="session")
def served(sg_model: tuple[Any, Any], sglang_cpu: Any, flavours: dict, caplog_module: list) -> dict[str, Any]:
    """Half the flavours at start (--lora-paths), half loaded afterwards (POST /load_lora_adapter)."""
    from sglang.srt.lora.lora_registry import LoRARef

    model, model_config = sg_model
    names = list(flavours)
    at_start = {name: flavours[name][0] for name in names[::2]}
    manager, refs = lora_manager(model, model_config, sglang_cpu, at_start, max_loras_per_batch=len(names) + 2)
    for name in names[1::2]:
        refs[name] = LoRARef(lora_name=name, lora_path=str(flavours[name][0]), pinned=False)
        result = manager.load_lora_adapter(refs[name])
        assert result.success, result.error_message
    manager.fetch_new_loras({ref.lora_id for ref in refs.values()})
    return {"manager": manager, "refs": refs, "model": model}


@pytest.fixture(scope="session")
def caplog_module() -> Iterator[list[logging.LogRecord]]:
    """Records gemma4-bridge's log lines for the whole module (the served fixture's loads)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, log = Keep(level=logging.INFO), logging.getLogger("gemma4_bridge")
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)
