"""The Gemma 4 family through the SGLang class (SGLang 0.5.23, CPU: no server, see conftest.py).

SGLang 0.5.23 has classes for every member: ``gemma4_mm.Gemma4ForConditionalGeneration`` runs the
26B-A4B MoE (its language model builds ``Gemma4MoE``) and the 31B; ``gemma4_unified`` has the 12B
Unified, a subclass of the multimodal class (same LoRA: language model only, same sizing bugs).
Here: SGLang resolves both architectures to gemma4-bridge's classes; each member's language-model
adapter is prepared for SGLang's loader with PEFT's deltas (V of k_eq_v layers gets k_proj's);
expert LoRA (every form) and Unified embedder LoRA are refused naming ``gemma4-bridge merge``,
exactly as ``inspect`` predicts for the SGLang class. Every member builds on CPU from its
transformers checkpoint through SGLang's own config loading, with LoRA sizes equal to the real
modules'; the 12B Unified only with the plugin loaded (hook 4: SGLang 0.5.23 parses its config
with the tower model's Gemma4Config), and its adapter goes through SGLang's own LoRAManager.
The E-series shapes the default fixture lacks (SHAPES_UNDER_TEST: named and seeded random ones) get the same preparation and build checks.
Not run: SGLang's forward pass (its attention and MoE kernels need a GPU: examples/sglang_gpu_check.py).
"""

from __future__ import annotations

import copy
import pkgutil
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from family_helpers import per_expert_form

from gemma4_bridge.testing.family import (
    EXPERT_PARAMETERS,
    NUM_EXPERTS,
    TEXT_LINEARS,
    UNIFIED_PATCH_SIZE,
    UNIFIED_POOLING,
    build_family_member,
    family_spec,
    load_family_model,
    write_family_adapter,
)
from gemma4_bridge.testing.fixtures import PATTERNED_LORA, SHAPES_UNDER_TEST, build_tiny_gemma4, write_peft_adapter

ARCHES = {"Gemma4ForConditionalGeneration": "gemma4_mm", "Gemma4UnifiedForConditionalGeneration": "gemma4_unified"}
MEMBER_ARCH = {"moe": "Gemma4ForConditionalGeneration", "dense": "Gemma4ForConditionalGeneration", "unified": "Gemma4UnifiedForConditionalGeneration",
               **dict.fromkeys(SHAPES_UNDER_TEST, "Gemma4ForConditionalGeneration")}
# The family members, then E-series shapes the default fixture lacks (other widths, head counts,
# layer patterns, seeded random ones: gemma4_bridge.testing.fixtures.SHAPES_UNDER_TEST).
BUILT = ["moe", "dense", "unified", *SHAPES_UNDER_TEST]
SGLANG_CLASS = "SGLang 0.5.23 + gemma4-bridge class"
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """{member: {"model", "text", and the adapters SGLang must refuse}}."""
    out: dict[str, dict[str, Path]] = {}
    for member in ("moe", "dense", "unified"):
        root = tmp_path_factory.mktemp(member)
        model = build_family_member(root / "model", family_spec(member))
        out[member] = {"model": model, "text": write_family_adapter(model, root / "text", seed=11)}
    for shape, spec in SHAPES_UNDER_TEST.items():  # rsLoRA and rank/alpha patterns, which SGLang itself ignores
        model = build_tiny_gemma4(tmp_path_factory.mktemp(shape) / "model", spec)
        text = write_peft_adapter(model, model.parent / "text", target_modules=TEXT_LINEARS, seed=14, **PATTERNED_LORA)
        out[shape] = {"model": model, "text": text}
    moe = out["moe"]
    moe["experts"] = write_family_adapter(moe["model"], moe["model"].parent / "experts", target_parameters=EXPERT_PARAMETERS, seed=12)
    moe["per_expert"] = per_expert_form(moe["experts"], moe["model"].parent / "per_expert", NUM_EXPERTS, fused_gate_up=False)
    unified = out["unified"]
    unified["embedders"] = write_family_adapter(
        unified["model"], unified["model"].parent / "embedders", target_modules=r".*(language_model.*\.q_proj|patch_dense|embedding_projection)", seed=13
    )
    return out


@pytest.mark.parametrize("arch", list(ARCHES))
def test_sglang_resolves_family_classes_to_ours(arch: str) -> None:
    import importlib

    from sglang.srt.plugins import load_plugins

    load_plugins()  # before SGLang's model loader is imported: that is when the plugin hook applies
    from sglang.srt.configs.model_config import ModelImpl
    from sglang.srt.model_loader.utils import get_model_architecture

    config = SimpleNamespace(hf_config=SimpleNamespace(architectures=[arch]), quantization=None, model_impl=ModelImpl.AUTO, is_embedding_gemma=False)
    cls = get_model_architecture(config)[0]
    builtin = getattr(importlib.import_module(f"sglang.srt.models.{ARCHES[arch]}"), arch)
    assert (cls.__module__, cls.__name__) == ("gemma4_bridge.plugins.sglang.model", arch)
    assert issubclass(cls, builtin) and cls is not builtin
    assert cls.get_hidden_dim is not builtin.get_hidden_dim  # per-layer sizes, not the top-level config's
    from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration as Multimodal

    # What the Unified class relies on upstream: SGLang's Unified LoRA is the multimodal class's
    # (language-model layers only), so the same sizing and loading fixes apply to it.
    assert issubclass(builtin, Multimodal) and builtin.should_apply_lora is Multimodal.should_apply_lora
    assert cls.should_apply_lora(cls, "language_model.layers.0.self_attn.qkv_proj")
    assert not cls.should_apply_lora(cls, "embed_vision.embedding_projection")


def _peft_deltas(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_family_model(model_dir), adapter)
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").double()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    }


@pytest.mark.parametrize("member", BUILT)
def test_language_model_lora_prepared_with_peft_deltas(member: str, members: dict[str, dict[str, Path]]) -> None:
    """What SGLang's loader receives holds PEFT's delta for every text-layer slice SGLang applies."""
    from gemma4_bridge.converters.inspect import inspect_adapter
    from gemma4_bridge.layout import Gemma4Layout
    from gemma4_bridge.plugins.sglang.adapter import prepare_adapter
    from gemma4_bridge.plugins.sglang.dims import lora_dims

    paths = members[member]
    layout = Gemma4Layout.from_model_dir(paths["model"])
    verdict = {v.server: v for v in inspect_adapter(paths["text"], base=paths["model"]).verdicts}[SGLANG_CLASS]
    assert verdict.status == "loads", verdict.notes
    prepared = prepare_adapter(paths["text"], layout)
    scaling = prepared.config["lora_alpha"] / prepared.config["r"]  # one scaling: rsLoRA and patterns are folded in
    peft = _peft_deltas(paths["model"], paths["text"])
    checked = 0
    for text_layer in layout.text_layers:
        for leaf, parent in PARENT.items():
            path = f"model.language_model.layers.{text_layer.index}.{parent}.{leaf}"
            a = prepared.tensors.get(f"base_model.model.{path}.lora_A.weight")
            if a is None:
                continue
            got = scaling * prepared.tensors[f"base_model.model.{path}.lora_B.weight"].double() @ a.double()
            source = path.replace("v_proj", "k_proj") if leaf == "v_proj" and text_layer.v_is_k_proj else path
            want = peft.get(source)
            if want is None:  # KV-shared layer: SGLang keeps K/V columns transformers does not have
                assert text_layer.kv_role == "reuse" and not torch.count_nonzero(got)
                continue
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, p=path: f"{member} {p}: {m}")
            checked += 1
        for module in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):  # buffer sizes from the real weights
            assert lora_dims(layout, module, text_layer.index)[0] > 0
    assert checked >= 5 * len(layout.text_layers) - 2 * len(layout.kv_shared_layers)
    if member in ("moe", "dense"):
        assert layout.k_eq_v_layers
    assert bool(prepared.k_eq_v_layers) == bool(layout.k_eq_v_layers)  # V got k_proj's LoRA where V is K


@pytest.mark.parametrize(("member", "adapter", "what"), [
    ("moe", "experts", r"MoE expert parameters"),
    ("moe", "per_expert", r"MoE expert parameters"),
    ("unified", "embedders", r"language model only"),
])  # fmt: skip
def test_expert_and_embedder_lora_refused_naming_merge(member: str, adapter: str, what: str, members: dict[str, dict[str, Path]]) -> None:
    from gemma4_bridge.converters.inspect import inspect_adapter
    from gemma4_bridge.errors import BridgeError
    from gemma4_bridge.layout import Gemma4Layout
    from gemma4_bridge.plugins.sglang.adapter import prepare_adapter

    paths = members[member]
    verdict = {v.server: v for v in inspect_adapter(paths[adapter], base=paths["model"]).verdicts}[SGLANG_CLASS]
    assert verdict.status == "fails" and re.search(what, " ".join(verdict.notes))  # inspect prints the message
    with pytest.raises(BridgeError, match=what) as err:
        prepare_adapter(paths[adapter], Gemma4Layout.from_model_dir(paths["model"]))
    assert "gemma4-bridge merge" in str(err.value)


@contextmanager
def _published_for(sglang_cpu: Any, model_dir: Path) -> Iterator[Any]:
    """SGLang's runtime context for ``model_dir`` (the session's is restored afterwards)."""
    from sglang.test.parallel_groups import publish

    server_args = copy.copy(sglang_cpu)
    server_args.model_path = str(model_dir)
    publish(server_args, role="test")
    try:
        yield server_args
    finally:
        publish(sglang_cpu, role="test")


@pytest.fixture(scope="module")
def plugins_loaded() -> None:
    """What every SGLang process does before it parses the model's config: run the plugins."""
    from sglang.srt.plugins import load_plugins

    load_plugins()


@contextmanager
def _fresh_config_parse() -> Iterator[None]:
    """SGLang caches parsed configs by path (get_config): parse anew inside, and forget it afterwards."""
    from sglang.srt.utils.hf_transformers.config import get_config

    get_config.cache_clear()
    try:
        yield
    finally:
        get_config.cache_clear()


class _Built(dict):
    """{member: (our class built by SGLang's ModelConfig + load_weights on CPU, its ModelConfig)}, each
    built on first use (one member failing to build fails its own tests only)."""

    def __init__(self, members: dict[str, dict[str, Path]], sglang_cpu: Any) -> None:
        super().__init__()
        self.members, self.sglang_cpu = members, sglang_cpu

    def __missing__(self, member: str) -> tuple[Any, Any]:
        from sglang_helpers import build_sglang_model

        from gemma4_bridge.plugins.sglang import load_entry_class

        with _published_for(self.sglang_cpu, self.members[member]["model"]) as server_args, _fresh_config_parse():
            self[member] = build_sglang_model(server_args, load_entry_class(MEMBER_ARCH[member]))
        return self[member]


@pytest.fixture(scope="module")
def built(members: dict[str, dict[str, Path]], sglang_cpu: Any, plugins_loaded: None) -> _Built:
    return _Built(members, sglang_cpu)


def test_sglang_parses_unified_config_with_transformers_class(members: dict[str, dict[str, Path]], built: _Built) -> None:
    """With the plugin loaded, SGLang's own config loading (ModelConfig.from_server_args) gives the
    12B Unified checkpoint transformers' Gemma4UnifiedConfig: vision and audio configs equal to
    what transformers itself parses (SGLang 0.5.23 alone: a Gemma4VisionConfig without model_patch_size)."""
    from transformers import Gemma4UnifiedConfig

    hf_config = built["unified"][1].hf_config
    reference = Gemma4UnifiedConfig.from_pretrained(members["unified"]["model"])
    assert type(hf_config) is Gemma4UnifiedConfig
    for sub in ("vision_config", "audio_config"):
        assert type(getattr(hf_config, sub)) is type(getattr(reference, sub))
        assert getattr(hf_config, sub).to_dict() == getattr(reference, sub).to_dict(), sub
    assert hf_config.vision_config.model_patch_size == UNIFIED_PATCH_SIZE * UNIFIED_POOLING


@pytest.mark.parametrize("member", BUILT)
def test_sglang_builds_member_with_real_lora_sizes(member: str, members: dict[str, dict[str, Path]], built: _Built) -> None:
    """Our class builds the 26B-A4B-shaped MoE (SGLang's Gemma4MoE), the 31B-like model and the 12B
    Unified (its encoder-free embedders holding the checkpoint's weights) on CPU, and the LoRA buffer
    size it reports for every text layer is the real module's."""
    from safetensors.torch import load_file

    model = built[member][0]
    assert type(model).__name__ == MEMBER_ARCH[member] and type(model).__module__ == "gemma4_bridge.plugins.sglang.model"
    for index, layer in enumerate(model.language_model.layers):
        for parent, module in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj")):
            base = getattr(getattr(layer, parent), module)
            assert model.get_hidden_dim(module, index) == (base.input_size, base.output_size), (member, index, module)
    if member == "moe":
        assert all(layer.moe is not None for layer in model.language_model.layers)
    if member == "unified":
        checkpoint = load_file(members[member]["model"] / "model.safetensors")
        embedders = {k: v for k, v in checkpoint.items() if not k.startswith("model.language_model.")}
        expected = {"vision_embedder.patch_dense.weight", "embed_vision.embedding_projection.weight", "embed_audio.embedding_projection.weight"}
        assert {k.removeprefix("model.") for k in embedders} >= expected
        params = dict(model.named_parameters())
        for key, tensor in embedders.items():
            torch.testing.assert_close(params[key.removeprefix("model.")], tensor, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_sglang_loads_unified_language_model_lora_with_peft_deltas(members: dict[str, dict[str, Path]], built: _Built, sglang_cpu: Any) -> None:
    """SGLang's own LoRAManager over the built Unified: the text adapter (loaded as --lora-paths does)
    sits in SGLang's LoRA buffers as PEFT's deltas, slice by slice (zero where transformers has no
    module); the embedder adapter is refused through the same load path, naming merge, nothing half-loaded."""
    from sglang.srt.lora.lora_registry import LoRARef
    from sglang_helpers import lora_buffer_deltas, lora_manager

    paths, (model, model_config) = members["unified"], built["unified"]
    peft = _peft_deltas(paths["model"], paths["text"])
    with _published_for(sglang_cpu, paths["model"]) as server_args:
        manager, refs = lora_manager(model, model_config, server_args, {"text": paths["text"]}, max_loras_per_batch=3)
        uid = refs["text"].lora_id
        manager.fetch_new_loras({uid})
        got = lora_buffer_deltas(manager, model, uid)
        checked = 0
        for (layer, leaf), delta in got.items():
            text_layer = model.gemma4_layout.text_layers[layer]
            source = "k_proj" if leaf == "v_proj" and text_layer.v_is_k_proj else leaf
            want = peft.get(f"model.language_model.layers.{layer}.{PARENT[leaf]}.{source}")
            if want is None:
                assert not torch.count_nonzero(delta), (layer, leaf)
                continue
            torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6, msg=lambda m, k=(layer, leaf): f"{k}: {m}")
            checked += 1
        assert checked >= 5 * len(model.language_model.layers) - 2 * len(model.gemma4_layout.kv_shared_layers)
        before = set(manager.loras)
        ref = LoRARef(lora_name="embedders", lora_path=str(paths["embedders"]), pinned=False)
        result = manager._load_lora_adapter(ref)  # the path --lora-paths (start) and /load_lora_adapter take
    assert not result.success and result.error_message.startswith("gemma4-bridge: ")
    assert "language model only" in result.error_message and "gemma4-bridge merge" in result.error_message, result.error_message
    assert set(manager.loras) == before and ref.lora_id not in manager.configs


@pytest.mark.parametrize(("entry", "expect"), [
    ("alias", ["Gemma4VisionConfig", "SGLANG_PLUGINS", "gemma4_bridge", "SGLANG_EXTERNAL_MODEL_PACKAGE"]),
    ("changed", ["could not fix SGLang's parsing", "was left alone", "gemma4-bridge release that supports"]),
])  # fmt: skip
def test_unified_config_parsed_without_the_hook_is_refused_with_the_fix(
    entry: str, expect: list[str], members: dict[str, dict[str, Path]], sglang_cpu: Any, plugins_loaded: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process where SGLang still parses with its alias (only SGLANG_EXTERNAL_MODEL_PACKAGE, or a
    registry entry the hook does not know and so leaves alone): our Unified class refuses to be
    built, naming the cause and the fix, instead of SGLang's AttributeError on model_patch_size."""
    import gemma4_bridge.plugins.sglang as pkg
    from gemma4_bridge.errors import BridgeError
    from gemma4_bridge.plugins.sglang.upstream import CONFIG_REGISTRY, UNIFIED_MODEL_TYPE
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.utils.hf_transformers import common

    registry = pkgutil.resolve_name(CONFIG_REGISTRY)
    if entry == "alias":  # what SGLang 0.5.23 ships, as in a process that did not run the plugin
        monkeypatch.setitem(registry, UNIFIED_MODEL_TYPE, common._Gemma4UnifiedConfigAlias)
    else:
        changed = type("ChangedUpstreamAlias", (common._Gemma4UnifiedConfigAlias,), {})  # an entry the hook was not checked against
        monkeypatch.setitem(registry, UNIFIED_MODEL_TYPE, changed)
        monkeypatch.setattr(pkg, "unified_config_error", None)
        pkg.install_unified_config()  # what register() runs
        assert registry[UNIFIED_MODEL_TYPE] is changed
    with _published_for(sglang_cpu, members["unified"]["model"]) as server_args, _fresh_config_parse():
        hf_config = ModelConfig.from_server_args(server_args).hf_config
    assert type(hf_config.vision_config).__name__ == "Gemma4VisionConfig"
    assert not hasattr(hf_config.vision_config, "model_patch_size")  # what SGLang's class would trip on
    with pytest.raises(BridgeError, match="parsed this 12B Unified checkpoint's config.json as") as err:
        pkg.load_entry_class("Gemma4UnifiedForConditionalGeneration")(config=hf_config, quant_config=None)
    for fragment in expect:
        assert fragment in str(err.value), str(err.value)
