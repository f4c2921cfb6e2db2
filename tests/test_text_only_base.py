"""A text-only base: a ``Gemma4ForCausalLM`` checkpoint (model_type ``gemma4_text``), whose modules are
``model.layers.N...`` rather than ``model.language_model.layers.N...``.

Canonical keys and ``target_modules`` must name the modules of *that* class, or stock PEFT finds no
target ("Target modules ... not found") and merge looks for tensors the checkpoint does not have.
Adapters arrive in either naming (trained on the text-only class, or on the multimodal one); both
convert to the causal-LM naming and give PEFT's logits; merge equals PEFT's merge_and_unload.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_helpers import all_logits, dir_digest, write_variant
from safetensors import safe_open

from gemma4_bridge.cli import main
from gemma4_bridge.testing.fixtures import build_tiny_gemma4, load_tiny_model, variant, write_peft_adapter


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KV sharing and k_eq_v on, as in the multimodal fixture, but saved as Gemma4ForCausalLM."""
    spec = variant(causal_lm=True, vision=False, audio=False)
    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny_causal") / "model", spec)


@pytest.fixture(scope="module")
def causal_adapter(causal_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peft_adapter(causal_dir, tmp_path_factory.mktemp("causal_adapter") / "a", seed=4)


@pytest.fixture(scope="module")
def inputs() -> dict[str, dict[str, torch.Tensor]]:
    ids = torch.tensor([[2, 17, 301, 45, 99, 7, 260, 13, 88, 410]])
    return {"text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}


def _keys(adapter: Path) -> list[str]:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def _peft_logits(model_dir: Path, adapter: Path, inputs: dict, merge: bool = False) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_tiny_model(model_dir), adapter)
    return all_logits(model.merge_and_unload() if merge else model, inputs)["text"]


@pytest.mark.parametrize("naming", ["causal_lm", "multimodal"])
def test_convert_keeps_the_causal_lm_naming(naming, causal_dir, causal_adapter, inputs, tmp_path) -> None:
    source = causal_adapter
    if naming == "multimodal":  # trained on Gemma4ForConditionalGeneration's language model
        source = write_variant(causal_adapter, tmp_path / "mm", rename=lambda k: k.replace("base_model.model.model.", "base_model.model.model.language_model."))
        assert all(".language_model." in k for k in _keys(source))
    out = tmp_path / "out"
    assert main(["convert", str(source), "-o", str(out), "--base", str(causal_dir)]) == 0
    assert _keys(out) == _keys(causal_adapter)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] and not [t for t in config["target_modules"] if not t.startswith("model.") or "language_model" in t]
    assert main(["inspect", str(out), "--base", str(causal_dir)]) == 0  # healthy: nothing left to fix
    reference = _peft_logits(causal_dir, causal_adapter, inputs)
    base = all_logits(load_tiny_model(causal_dir), inputs)["text"]
    assert float((reference - base).abs().max()) > 1e-2  # the adapter moves the logits
    got = _peft_logits(causal_dir, out, inputs)  # stock PEFT, loading the converted adapter
    assert torch.allclose(got, reference, atol=1e-5), float((got - reference).abs().max())


def test_merge_into_causal_lm_checkpoint(causal_dir, causal_adapter, inputs, tmp_path) -> None:
    before = dir_digest(causal_dir)
    out = tmp_path / "merged"
    assert main(["merge", str(causal_adapter), "--base", str(causal_dir), "-o", str(out)]) == 0
    assert dir_digest(causal_dir) == before
    merged = all_logits(load_tiny_model(out), inputs)["text"]
    reference = _peft_logits(causal_dir, causal_adapter, inputs, merge=True)
    assert torch.allclose(merged, reference, atol=1e-5), float((merged - reference).abs().max())
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4_text"


@pytest.mark.vllm
def test_vllm_serves_causal_lm_base(causal_dir, causal_adapter, inputs, tmp_path, monkeypatch) -> None:
    """vLLM builds the plugin's Gemma4ForCausalLM for this base; adapters in either naming match PEFT."""
    import vllm.envs

    vllm.envs.disable_envs_cache()  # an earlier engine in this process froze vLLM's env reads
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    mm_named = write_variant(causal_adapter, tmp_path / "mm", rename=lambda k: k.replace("base_model.model.model.", "base_model.model.model.language_model."))
    llm = LLM(str(causal_dir), dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=2, seed=0, enable_lora=True, max_lora_rank=8)
    try:
        assert llm.apply_model(lambda m: type(m).__name__) == ["BridgeGemma4ForCausalLM"]
        ids = inputs["text"]["input_ids"][0].tolist()
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        reference = torch.log_softmax(_peft_logits(causal_dir, causal_adapter, inputs)[0], -1)[torch.arange(len(ids) - 1), ids[1:]]
        for lora_id, adapter in enumerate((causal_adapter, mm_named), start=1):
            out = llm.generate([{"prompt_token_ids": ids}], params, lora_request=LoRARequest(f"a{lora_id}", lora_id, str(adapter)), use_tqdm=False)[0]
            served = torch.tensor([e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)])
            assert float((served - reference).abs().max()) < 1e-3, (adapter.name, float((served - reference).abs().max()))
    finally:
        llm.llm_engine.engine_core.shutdown()
