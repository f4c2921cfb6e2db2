"""Fails when the SGLang code gemma4-bridge relies on changes: re-read it before trusting the hooks.

Two kinds of check. Fingerprints: the source of each SGLang function our hooks wrap or whose
behaviour our normalisation is shaped around, hashed; any edit upstream fails here with what we
assumed about it. Canaries: the upstream Gemma 4 LoRA defects this package exists for, shown on
the tiny model; when SGLang fixes one, the test says which part of ours may go.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import pkgutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

# target: (sha256 of its source, first 16 hex digits; what we rely on)
FINGERPRINTS: dict[str, tuple[str, str]] = {
    "sglang.srt.plugins:load_plugins": ("cd2a423a31293f61", "runs every sglang.srt.plugins entry point, then applies HookRegistry hooks; exceptions only logged"),
    "sglang.srt.plugins:load_plugins_by_group": ("9e455e447fd22684", "SGLANG_PLUGINS allow-list; ep.load() errors only logged"),
    "sglang.srt.plugins.hook_registry:HookRegistry._apply_target": ("e5b36a334656349f", "patches the module attribute and stale `from X import` bindings"),
    "sglang.srt.plugins.hook_registry:_wrap_fn": ("864f78c5d6544666", "BEFORE hook: called with the original arguments, None keeps them"),
    "sglang.srt.model_loader.utils:get_model_architecture": ("eb945a285e9b05cb", "the one place a checkpoint's architecture becomes a class (our BEFORE hook)"),
    "sglang.srt.models.registry:import_model_classes": ("806f81fe11d51adc", "external package: submodules' EntryClass by class name; import errors only logged"),
    "sglang.srt.models.registry:_ModelRegistry.resolve_model_cls": ("5e8bb641bc2d0e0c", "first architecture looked up in .models first"),
    "sglang.srt.models.gemma4_mm:Gemma4ForConditionalGeneration.__init__": ("308673c80a964dd3", "constructor signature; towers registered before the language model"),
    "sglang.srt.models.gemma4_mm:Gemma4ForConditionalGeneration.should_apply_lora": ("da63567e955db1c9", "LoRA only under language_model.layers."),
    "sglang.srt.models.gemma4_mm:Gemma4ForConditionalGeneration.load_weights": ("83483cee730434db", "k_eq_v: k_proj weight copied into the V slice of qkv_proj"),
    "sglang.srt.models.gemma4_causal:Gemma4Attention.__init__": ("e521bdf0650169e9", "qkv_proj = [q, k, v] on every layer, KV-shared ones included"),
    "sglang.srt.models.gemma4_causal:Gemma4Attention.forward": ("3e2f0f3572e49507", "KV-shared layers discard their K/V (so dropping their k/v LoRA is exact)"),
    "sglang.srt.models.gemma4_causal:Gemma4DecoderLayer.__init__": ("9e9975c609184ad8", "per-layer head sizes; double-wide MLP on KV-shared layers"),
    "sglang.srt.utils.hf_transformers.config:_apply_gemma4_attention_overrides": ("d0d3b6d3b55baed2", "flattens per_layer_config (why sizes come from the checkpoint)"),
    "sglang.srt.lora.lora_manager:LoRAManager._load_lora_adapter": ("2358ccd849131ffa", "(self, lora_ref) -> LoRAUpdateOutput; used at start and by /load_lora_adapter"),
    "sglang.srt.lora.lora_manager:LoRAManager._load_lora_adapter_from_tensors": ("6f93637837408e9b", "(self, lora_ref, tensors, config_dict, added_tokens_config) validates then loads"),
    "sglang.srt.lora.lora_manager:LoRAManager.create_lora_update_result": ("17c9086ad1068db2", "(success, error_message) -> LoRAUpdateOutput"),
    "sglang.srt.lora.lora_config:LoRAConfig.__init__": ("c6bb44fa7e0fe617", "reads r, lora_alpha, target_modules; ignores use_rslora and patterns"),
    "sglang.srt.lora.lora:LoRAAdapter.__init__": ("310e8ff8befc40c6", "one scaling lora_alpha / r per adapter"),
    "sglang.srt.lora.lora:LoRAAdapter._process_weight": ("14e753f404759201", "buckets tensors by the first `layers.N.` in the key"),
    "sglang.srt.lora.lora:LoRAAdapter.normalize_qkv_proj": ("9d130ea38012461a", "stacks q/k/v, reads v_proj unconditionally"),
    "sglang.srt.lora.lora:LoRAAdapter.normalize_gate_up_proj": ("916851828b4fdce5", "stacks gate/up; zero-element up_proj treated as absent"),
    "sglang.srt.lora.mem_pool:LoRAMemoryPool._dense_local_dim": ("47ea5a6a3f0b4031", "first (leaf, layer id) match over all modules, cached in _dense_linears"),
    "sglang.srt.lora.mem_pool:LoRAMemoryPool.get_lora_A_shape": ("4835e679f738c688", "A buffer [slots, rank * stacked, in] from get_hidden_dim"),
    "sglang.srt.lora.mem_pool:LoRAMemoryPool.get_lora_B_shape": ("1af3f5c9703e4730", "B buffer [slots, out, rank] from get_hidden_dim"),
    "sglang.srt.lora.utils:get_hidden_dim": ("60734b40ec3990c7", "asks the model's get_hidden_dim(module_name, layer_idx)"),
    "sglang.srt.lora.utils:get_normalized_target_modules": ("b7a85037ab00e602", "q/k/v -> qkv_proj, gate/up -> gate_up_proj; strings other than all(-linear) refused"),
    "sglang.srt.lora.utils:get_target_module_name": ("49bf2d90eb74b962", "substring match of the stacked name in the tensor key"),
    "sglang.srt.lora.utils:get_stacked_multiply": ("a3cff041ddfbabd3", "qkv_proj 3, gate_up_proj 2"),
    "sglang.srt.utils.hf_transformers.config:HfModelConfigParser.parse": (
        "178843edf3c90c5f", "re-reads a model_type found in _CONFIG_REGISTRY with the registry's class (the entry hook 4 replaces)"),
    "sglang.srt.utils.hf_transformers.config:get_config": (
        "fe60e8bb60b3dd97", "one parser per call, cached by path: a parse before the plugins ran sticks (the Unified class refuses it)"),
    "sglang.srt.utils.hf_transformers.common:_Gemma4UnifiedConfigAlias": (
        "8c800a49f3f5d070", "the alias hook 4 replaces: the tower model's Gemma4Config under model_type gemma4_unified"),
    "sglang.srt.models.gemma4_unified:Gemma4UnifiedForConditionalGeneration.__init__": (
        "bc6d81cbdc502567", "reads Gemma4UnifiedConfig's vision/audio configs (model_patch_size, mm_embed_dim, output_proj_dims)"),
}


@pytest.mark.parametrize("target", sorted(FINGERPRINTS))
def test_upstream_code_is_the_code_we_read(target: str) -> None:
    digest, assumption = FINGERPRINTS[target]
    source = inspect.getsource(inspect.unwrap(pkgutil.resolve_name(target)))
    got = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert got == digest, (
        f"SGLang changed {target}. gemma4-bridge relies on it: {assumption}. Re-read it, re-run tests/sglang "
        f"(and the GPU check), then update FINGERPRINTS and upstream.SUPPORTED_SGLANG_RANGE."
    )


def test_builtin_lora_sizes_are_wrong_for_gemma4(sg_model: tuple[Any, Any]) -> None:
    """Why get_hidden_dim is overridden: the built-in reads sizes the multimodal config lacks."""
    from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration as Builtin

    model = sg_model[0]
    try:
        builtin = Builtin.get_hidden_dim(model, "qkv_proj", 1)
    except Exception as exc:  # today: transformers refuses the global head_dim of a per-layer config
        assert "head_dim" in str(exc) or "hidden_size" in str(exc), exc
        return
    assert builtin != model.get_hidden_dim("qkv_proj", 1), "upstream fixed get_hidden_dim: dims.py may be retired"


def test_builtin_adapter_loading_breaks_on_gemma4_adapters(sg_model: tuple[Any, Any], sg_adapters: dict[str, Path]) -> None:
    """Why adapters are normalised: SGLang's loader reads v_proj unconditionally (KeyError on k_eq_v
    and KV-shared layers) and refuses PEFT's regex target_modules."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.lora.lora import LoRAAdapter
    from sglang.srt.lora.lora_config import LoRAConfig
    from sglang.srt.lora.utils import get_normalized_target_modules

    model = sg_model[0]
    src = sg_adapters["text"]
    config = LoRAConfig(str(src))
    assert isinstance(config.target_modules, str)  # PEFT saved the regex
    with pytest.raises(ValueError, match="Only 'all' or 'all-linear'"):
        get_normalized_target_modules(config.target_modules)
    explicit = LoRAConfig.from_dict({**config.hf_config, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    adapter = LoRAAdapter("raw", explicit, model.config.text_config, LoadConfig(), None, base_model=model)
    with pytest.raises(KeyError, match="v_proj"):
        adapter.initialize_weights_from_tensors(load_file(src / "adapter_model.safetensors"))


# Hook 4 (Unified config parsing) must run before SGLang parses the model's config in every process.
# Each SGLang process entry: (function, or a module's `if __name__ == "__main__":` block; the first
# statement that can parse the config or publish the server args for parsing).
PROCESS_ENTRIES: dict[str, str] = {
    "sglang.launch_server:__main__": "prepare_server_args",
    "sglang.cli.serve:serve": "auto_detect",
    "sglang.srt.entrypoints.engine:Engine.__init__": "server_args",
    "sglang.srt.entrypoints.engine:Engine._launch_subprocesses": "check_server_args",
    "sglang.srt.managers.scheduler:run_scheduler_process": "publish(",
    "sglang.srt.managers.data_parallel_controller:run_data_parallel_controller_process": "publish(",
    "sglang.srt.managers.detokenizer_manager:run_detokenizer_process": "publish(",
}


def _entry_statements(target: str) -> list[str]:
    """The top-level statements of ``target``'s body (docstring left out), as source."""
    module_name, qualname = target.split(":")
    if qualname == "__main__":
        tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
        body = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)).body
    else:
        function = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(pkgutil.resolve_name(target))))).body[0]
        assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        body = function.body
    docstring = body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    return [ast.unparse(n) for n in body[1 if docstring else 0 :]]


@pytest.mark.parametrize("target", sorted(PROCESS_ENTRIES))
def test_every_sglang_process_runs_plugins_before_it_parses_the_config(target: str) -> None:
    """Hook 4 is installed by our plugin entry point: each process must run load_plugins() first."""
    statements = _entry_statements(target)
    marker = PROCESS_ENTRIES[target]
    plugins = next((i for i, s in enumerate(statements) if "load_plugins()" in s), None)
    parse = next((i for i, s in enumerate(statements) if marker in s and "load_plugins()" not in s), None)
    assert plugins is not None and parse is not None and plugins < parse, (
        f"SGLang changed {target}: it no longer runs load_plugins() before `{marker}`. gemma4-bridge's "
        "plugin makes SGLang parse 12B Unified configs with transformers' Gemma4UnifiedConfig (hooks.use_unified_config); "
        "find where this process now parses the config and install the hook before it."
    )


def test_sglang_still_parses_unified_with_its_gemma4_alias(tmp_path: Path) -> None:
    """Why hook 4 exists: SGLang's own registry entry for gemma4_unified is the tower model's
    Gemma4Config, which loses Unified's vision config. Fails when SGLang fixes it: then
    hooks.use_unified_config and upstream.CONFIG_REGISTRY/UNIFIED_CONFIG_ALIAS may be retired."""
    from sglang.srt.utils.hf_transformers import common
    from transformers import Gemma4Config

    from gemma4_bridge.plugins.sglang.upstream import UNIFIED_CONFIG_ALIAS, UNIFIED_MODEL_TYPE
    from gemma4_bridge.testing.family import build_family_member, family_spec

    module = ast.parse(inspect.getsource(common))
    entries = [ast.unparse(n) for n in module.body if UNIFIED_MODEL_TYPE in ast.unparse(n) and "_CONFIG_REGISTRY[" in ast.unparse(n)]
    assert any(f"_CONFIG_REGISTRY['{UNIFIED_MODEL_TYPE}'] = {UNIFIED_CONFIG_ALIAS}" in e for e in entries), (
        f"SGLang no longer registers {UNIFIED_CONFIG_ALIAS} for '{UNIFIED_MODEL_TYPE}': hook 4 may be retired"
    )
    alias = getattr(common, UNIFIED_CONFIG_ALIAS)
    assert issubclass(alias, Gemma4Config) and alias.model_type == UNIFIED_MODEL_TYPE
    model = build_family_member(tmp_path / "unified", family_spec("unified", audio=False))
    parsed = alias.from_pretrained(model)
    assert type(parsed.vision_config).__name__ == "Gemma4VisionConfig"
    assert not hasattr(parsed.vision_config, "model_patch_size"), f"SGLang's {UNIFIED_CONFIG_ALIAS} parses Unified right now: hook 4 may be retired"
