"""Gemma 4 shapes the default fixture does not have, as an independent check would pick them.

Nothing here may be tuned to the default tiny model: other widths and head counts, a longer layer
pattern with a three-layer KV-shared tail and no per-layer embeddings (as E2B/E4B-like checkpoints
differ), a vision tower of two layers and another width without ``attention_k_eq_v``, an audio
tower of two layers beside the double-wide MLP of KV-shared layers. On each, a PEFT all-linear
adapter with rsLoRA and rank/alpha patterns, saved with hand-saved ``.default.`` names, must convert
to PEFT's exact logits, merge to PEFT's ``merge_and_unload`` and be served by vLLM at parity.
Beside the three named shapes, seeded random ones (``random_shape``: depth, KV-shared tail, layer
pattern, head counts and sizes, widths, k_eq_v, towers) go through the same checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from convert_helpers import all_logits, base_plus, default_adapter_name, lora_deltas, mm_inputs, randomize_lora, write_variant
from vllm_helpers import TOL, assert_parity, hf_inputs, hf_model, hf_prompt_logprobs, vllm_request

from gemma4_bridge.converters import convert_adapter, inspect_adapter, merge_adapter
from gemma4_bridge.testing.family import kv_sharing_runs_without_per_layer_inputs
from gemma4_bridge.testing.fixtures import PATTERNED_LORA, SHAPES_UNDER_TEST, TinySpec, build_tiny_gemma4, load_tiny_model, write_peft_adapter


def kinds(spec: TinySpec) -> list[str]:
    """The prompt kinds the shape can take: text, and image / audio where it has the tower."""
    return ["text", *(["image"] if spec.vision else []), *(["audio"] if spec.audio else [])]


@pytest.fixture(scope="module", params=list(SHAPES_UNDER_TEST))
def shape(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """(model, PEFT adapter, the same adapter hand-saved, prompt kinds) for one shape."""
    spec = SHAPES_UNDER_TEST[request.param]
    if spec.overrides.get("text", {}).get("hidden_size_per_layer_input") == 0 and not kv_sharing_runs_without_per_layer_inputs():
        pytest.skip("the installed transformers cannot forward KV-shared layers without per-layer inputs (5.24: TypeError), so it is no reference")
    root = tmp_path_factory.mktemp(request.param)
    model = build_tiny_gemma4(root / "model", spec)
    peft = write_peft_adapter(model, root / "peft", seed=5, **PATTERNED_LORA)
    return {"model": model, "peft": peft, "raw": write_variant(peft, root / "raw", rename=default_adapter_name), "kinds": kinds(spec)}


def test_convert_and_merge_keep_peft_numbers(shape: dict[str, Any], tmp_path: Path) -> None:
    model, peft, raw = shape["model"], shape["peft"], shape["raw"]
    report = inspect_adapter(raw, base=model)
    assert report.status == "fixable" and "adapter-name-in-keys" in report.flavours, (report.status, report.flavours)
    inputs = {k: v for k, v in mm_inputs(model).items() if k in shape["kinds"]}
    reference = all_logits(hf_model(model, peft), inputs)
    base = all_logits(load_tiny_model(model), inputs)
    assert all(float((reference[k] - base[k]).abs().max()) > 0.1 for k in inputs), "the adapter must move every modality"
    convert_adapter(raw, tmp_path / "canonical", base=model)
    converted = all_logits(hf_model(model, tmp_path / "canonical"), inputs)
    merge_adapter(raw, model, tmp_path / "merged")
    merged = all_logits(load_tiny_model(tmp_path / "merged"), inputs)
    peft_merged = all_logits(hf_model(model, peft).merge_and_unload(), inputs)
    for k in inputs:
        assert torch.equal(converted[k], reference[k]), (k, float((converted[k] - reference[k]).abs().max()))
        assert float((merged[k] - peft_merged[k]).abs().max()) < 1e-5, k


@pytest.mark.vllm
def test_vllm_serves_the_hand_saved_adapter(shape: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.envs

    vllm.envs.disable_envs_cache()  # an earlier engine in this process froze vLLM's env reads
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model = shape["model"]
    llm = LLM(str(model), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0, enable_lora=True,
              max_lora_rank=8, enable_tower_connector_lora=True,
              limit_mm_per_prompt={kind: 1 for kind in shape["kinds"] if kind != "text"})  # fmt: skip
    try:
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        lora = LoRARequest("raw", 1, str(shape["raw"]))
        reference, base = hf_model(model, shape["peft"]), hf_model(model)
        for kind in shape["kinds"]:
            inputs = hf_inputs(model, kind)
            expected = hf_prompt_logprobs(reference, inputs)
            assert float((expected[1] - hf_prompt_logprobs(base, inputs)[1]).abs().max()) > 10 * TOL, kind
            assert_parity(llm.generate([vllm_request(kind)], params, lora_request=lora, use_tqdm=False)[0], expected, kind)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_training_wrapper_targets_and_saves_canonically(shape: dict[str, Any], tmp_path: Path) -> None:
    """prepare_model + lora_config on the shape: all-linear targets reach the tower linears inside the
    clamp; logits equal an independent W + scaling * B @ A reference; the saved adapter is canonical
    (convert renames nothing) and stock PEFT reloads it to the same logits."""
    from peft import LoraConfig, get_peft_model

    from gemma4_bridge.converters.canonical import plan
    from gemma4_bridge.layout import Gemma4Layout
    from gemma4_bridge.train import lora_config, prepare_model, save_adapter

    model_dir = shape["model"]
    inputs = {k: v for k, v in mm_inputs(model_dir).items() if k in shape["kinds"]}
    prepared = prepare_model(load_tiny_model(model_dir))
    model = get_peft_model(prepared, lora_config(prepared, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    randomize_lora(model)
    trained = all_logits(model, inputs)
    want, base = all_logits(base_plus(model_dir, lora_deltas(model)), inputs), all_logits(load_tiny_model(model_dir), inputs)
    for k in inputs:
        assert float((trained[k] - base[k]).abs().max()) > 0.1, k
        # float32 reassociation (x @ (W + BA) vs x @ W + (x @ A) @ B) grows with depth: 1.6e-5 at 7 layers,
        # 0 in float64; a missing or misplaced delta is ~1e-2.
        assert float(((trained[k] - want[k]).norm() / want[k].norm())) < 1e-4, k
    out = save_adapter(model, tmp_path / "adapter")
    report = plan(out, Gemma4Layout.from_model_dir(model_dir))
    assert report.healthy and not report.problems and report.renamed == 0, report.problems
    reloaded = all_logits(hf_model(model_dir, out), inputs)
    assert all(torch.equal(reloaded[k], trained[k]) for k in inputs)
