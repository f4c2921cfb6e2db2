"""SGLang's own adapter loading, run on CPU, serves each adapter flavour with PEFT's numbers.

One real LoRAManager (torch_native backend) over our class: adapters are loaded the two ways a
server loads them (``--lora-paths`` at start, ``/load_lora_adapter`` later) plus SGLang's
from-tensors API, copied into SGLang's LoRA buffers by SGLang's memory pool, and read back out:
for every layer and every q/k/v/o/gate/up/down slice, ``scaling * B @ A`` as SGLang's kernels
slice the buffers must equal PEFT's ``get_delta_weight`` for that module (zero where the adapter
has none; on k_eq_v layers V gets k_proj's delta, as transformers computes V from k_proj).

Not run here: SGLang's server and its CUDA LoRA kernels (no GPU); the forward pass on GPU is
what examples/sglang_gpu_check.py compares with transformers + PEFT.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from convert_helpers import peft_deltas, write_variant
from safetensors.torch import load_file
from sglang_helpers import lora_buffer_deltas

PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def buffer_deltas(served: dict[str, Any], name: str) -> dict[tuple[int, str], torch.Tensor]:
    """``scaling * B @ A`` per (layer, slice), read out of SGLang's LoRA buffers as its kernels slice them."""
    return lora_buffer_deltas(served["manager"], served["model"], served["refs"][name].lora_id)


def expected_deltas(model_dir: Path, adapter: Path, layout: Any) -> dict[tuple[int, str], torch.Tensor]:
    """PEFT's own deltas per (layer, slice); V of k_eq_v layers is k_proj's (V = k_proj output)."""
    peft = {k: v for k, v in peft_deltas(model_dir, adapter).items() if ".language_model." in k}
    out = {}
    for text_layer in layout.text_layers:
        for leaf in PARENT:
            source = "k_proj" if leaf == "v_proj" and text_layer.k_eq_v and text_layer.has_k_proj else leaf
            delta = peft.get(f"model.language_model.layers.{text_layer.index}.{PARENT[leaf]}.{source}")
            if leaf in ("k_proj", "v_proj") and text_layer.kv_role == "reuse":
                assert delta is None  # transformers has no k/v there
            out[(text_layer.index, leaf)] = delta
    return out


@pytest.mark.parametrize(
    "name", ["regex_targets", "peft_default_qv", "rslora_patterns", "default_in_keys", "vllm_names", "causal_lm_names", "kv_shared_extras"]
)
def test_sglang_buffers_hold_peft_deltas(name: str, served: dict, flavours: dict, sg_model_dir: Path, sg_model: tuple) -> None:
    got = buffer_deltas(served, name)
    want = expected_deltas(sg_model_dir, flavours[name][1], sg_model[0].gemma4_layout)
    nonzero = 0
    for key, delta in want.items():
        if delta is None:
            assert torch.count_nonzero(got[key]) == 0, f"{name} {key}: SGLang would apply a delta the adapter does not have"
            continue
        nonzero += 1
        assert got[key].shape == delta.shape, key
        torch.testing.assert_close(got[key], delta, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{name} {key}: {m}")
    assert nonzero >= 7  # the comparison saw real deltas, not only zeros (q/v-only: 5 q + 2 v)


def test_k_eq_v_value_slice_carries_the_k_proj_delta(served: dict, sg_model: tuple) -> None:
    """Spelled out for layer 1 (full attention, k_eq_v): the case vLLM 0.32 serves wrongly."""
    layout = sg_model[0].gemma4_layout
    assert 1 in layout.k_eq_v_layers
    got = buffer_deltas(served, "regex_targets")
    assert torch.count_nonzero(got[(1, "k_proj")]) > 0
    torch.testing.assert_close(got[(1, "v_proj")], got[(1, "k_proj")], rtol=0, atol=0)


def test_kv_shared_extras_are_dropped_with_a_logged_count(served: dict, caplog_module: list) -> None:
    lines = [r.getMessage() for r in caplog_module if "kv_shared_extras" in r.getMessage()]
    assert any(re.search(r"dropped 8 k/v LoRA tensor\(s\) on KV-shared/k_eq_v layers \[3, 4\]", line) for line in lines), lines
    assert all(r.levelno == logging.WARNING for r in caplog_module if "dropped" in r.getMessage())


def test_regex_target_modules_become_an_explicit_list(served: dict) -> None:
    config = served["manager"].configs[served["refs"]["regex_targets"].lora_id]
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert served["manager"].target_modules == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_from_tensors_api_is_normalised_too(served: dict, sg_adapters: dict) -> None:
    """POST /load_lora_adapter_from_tensors (RL weight sync) goes through the same normalisation."""
    import json

    from sglang.srt.lora.lora_registry import LoRARef

    manager, src = served["manager"], sg_adapters["text"]
    config = json.loads((src / "adapter_config.json").read_text())
    ref = LoRARef(lora_name="from_tensors", lora_path="in-memory", pinned=False)
    result = manager.load_lora_adapter_from_tensors(ref, load_file(src / "adapter_model.safetensors"), config)
    assert result.success, result.error_message
    names = [n for layer in manager.loras[ref.lora_id].layers for n in layer.weights]
    assert any(".layers.1.self_attn.qkv_proj.lora_A" in n for n in names)


@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        ("all_linear", ["vision_tower", "audio_tower", "SGLang applies LoRA to the language model only", "Fix: serve this adapter with vLLM"]),
        ("zero3", ["zero elements", "DeepSpeed ZeRO-3", "gemma4-bridge convert", "--zero3-checkpoint"]),
        ("dora", ["use_dora=true", "DoRA"]),
    ],
)
def test_unservable_adapters_are_refused_by_name(
    kind: str, expect: list[str], served: dict, sg_adapters: dict, tmp_path: Path
) -> None:
    from sglang.srt.lora.lora_registry import LoRARef

    text = sg_adapters["text"]
    path = {
        "all_linear": sg_adapters["all_linear"],
        "zero3": write_variant(
            text, tmp_path / "z3", transform=lambda k, v: v.new_zeros(0) if ".layers.2.mlp." in k else v
        ),
        "dora": write_variant(text, tmp_path / "dora", config_update={"use_dora": True}),
    }[kind]
    manager = served["manager"]
    before = set(manager.loras)
    ref = LoRARef(lora_name=f"bad_{kind}", lora_path=str(path), pinned=False)
    result = manager._load_lora_adapter(ref)  # the path --lora-paths (start) and /load_lora_adapter take
    assert not result.success
    assert result.error_message.startswith("gemma4-bridge: ")
    for fragment in expect:
        assert fragment in result.error_message, result.error_message
    assert set(manager.loras) == before and ref.lora_id not in manager.configs  # nothing half-loaded
