"""SGLang's own LoRA layers, run on CPU, compute what transformers + PEFT compute, module by module.

SGLang's ``torch_native`` LoRA backend is plain torch, so its real LoRA-wrapped modules (the fused
``qkv_proj`` and ``gate_up_proj``, ``o_proj``, ``down_proj``) run here on the buffers the manager
filled. One batch mixes tokens of four adapters and of the base model (SGLang's multi-adapter
batching); each token's output must equal the PEFT model of its adapter: q, k and v (on k_eq_v
layers V is the k_proj output, so the V columns must equal k_proj's), gate and up, o, down. On
KV-shared layers SGLang computes K/V columns it then discards; the adapter must add nothing there.

Not run here: the CUDA kernels (triton/csgmv backends) and attention; examples/sglang_gpu_check.py
compares whole-model logprobs on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

ADAPTERS = ["regex_targets", "peft_default_qv", "rslora_patterns", "kv_shared_extras", None]  # None: base model
TOKENS_PER_ADAPTER = 2


@pytest.fixture(scope="module")
def peft_models(sg_model_dir: Path, flavours: dict) -> dict[Path, Any]:
    from peft import PeftModel

    from gemma4_bridge.testing.fixtures import load_tiny_model

    return {ref: PeftModel.from_pretrained(load_tiny_model(sg_model_dir), ref).eval() for ref in {flavours[n][1] for n in ADAPTERS if n}}


@pytest.fixture(scope="module")
def batch(served: dict) -> list[str | None]:
    """Point SGLang's LoRA backend at one mixed decode batch: token t uses ADAPTERS[t % 5]."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    names = [ADAPTERS[t % len(ADAPTERS)] for t in range(len(ADAPTERS) * TOKENS_PER_ADAPTER)]
    ids = [served["refs"][n].lora_id if n else None for n in names]
    served["manager"].prepare_lora_batch(SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=len(ids), lora_ids=ids))
    return names


def _hf_layer(model: Any, layer: int) -> Any:
    return model.base_model.model.model.language_model.layers[layer]


@torch.no_grad()
def _reference(peft_models: dict, flavours: dict, name: str | None, layer: int, module: str, x: torch.Tensor, layout: Any) -> torch.Tensor:
    """transformers + PEFT output of the linears SGLang fused into ``module``, for adapter ``name``."""
    model = next(iter(peft_models.values())) if name is None else peft_models[flavours[name][1]]
    hf = _hf_layer(model, layer)
    text_layer = layout.text_layers[layer]

    def run() -> torch.Tensor:
        if module == "qkv_proj":
            q = hf.self_attn.q_proj(x)
            if text_layer.kv_role == "reuse":
                return q  # K/V columns checked separately: transformers has no k_proj/v_proj here
            k = hf.self_attn.k_proj(x)
            v = k if text_layer.k_eq_v else hf.self_attn.v_proj(x)  # transformers: V = k_proj output
            return torch.cat([q, k, v], dim=-1)
        if module == "gate_up_proj":
            return torch.cat([hf.mlp.gate_proj(x), hf.mlp.up_proj(x)], dim=-1)
        return getattr(hf.self_attn if module == "o_proj" else hf.mlp, module)(x)

    if name is None:
        with model.disable_adapter():
            return run()
    return run()


@pytest.mark.parametrize("module", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
def test_sglang_lora_modules_match_peft(module: str, served: dict, batch: list, peft_models: dict, flavours: dict, sg_model: tuple) -> None:
    model = served["model"]
    layout = sg_model[0].gemma4_layout
    gen = torch.Generator().manual_seed(0)
    moved = 0.0
    for layer, sg_layer in enumerate(model.language_model.layers):
        sg_module = getattr(sg_layer.self_attn if module in ("qkv_proj", "o_proj") else sg_layer.mlp, module)
        assert type(sg_module).__name__.endswith("WithLoRA"), "SGLang did not wrap the module with LoRA"
        x = torch.randn(len(batch), sg_module.base_layer.input_size, generator=gen)
        with torch.no_grad():
            out = sg_module(x)[0]
            base_out = sg_module.base_layer(x)[0]
        for t, name in enumerate(batch):
            want = _reference(peft_models, flavours, name, layer, module, x[t : t + 1], layout)[0]
            got = out[t, : want.shape[-1]]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name, l=layer: f"{n} layer {l} {module}: {m}")
            if want.shape[-1] < out.shape[-1]:  # KV-shared layer: the adapter must not touch the discarded K/V
                torch.testing.assert_close(out[t, want.shape[-1] :], base_out[t, want.shape[-1] :], rtol=0, atol=0, equal_nan=True)
            if name is not None:
                moved = max(moved, float((got - base_out[t, : want.shape[-1]]).abs().max()))
    assert moved > 1e-2, "the adapters did not change the outputs: the comparison proves nothing"
