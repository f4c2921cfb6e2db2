"""convert: every adapter flavour becomes the canonical layout with the same effective deltas and logits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from convert_helpers import (
    PREFIX,
    all_logits,
    default_adapter_name,
    drop_tower_linear,
    file_deltas,
    mm_inputs,
    no_prefix,
    peft_deltas,
    write_variant,
)
from safetensors import safe_open
from safetensors.torch import load_file

from gemma4_bridge.converters import convert_adapter
from gemma4_bridge.testing.fixtures import load_tiny_model, write_peft_adapter


def _vllm_naming(key: str) -> str:
    key = key.replace(f"{PREFIX}model.language_model.", f"{PREFIX}language_model.model.")
    return re.sub(rf"^{re.escape(PREFIX)}model\.(vision_tower|audio_tower|embed_vision|embed_audio)\.", rf"{PREFIX}\1.", key)


def _kv_shared_extras() -> dict[str, torch.Tensor]:
    """k/v LoRA on KV-shared layers 3 (sliding, head 32) and 4 (full, head 64): what 5.5.0/5.5.1 training saved."""
    gen = torch.Generator().manual_seed(7)
    extra = {}
    for layer, out in ((3, 32), (4, 64)):
        for proj in ("k_proj", "v_proj"):
            base = f"{PREFIX}model.language_model.layers.{layer}.self_attn.{proj}"
            extra[f"{base}.lora_A.weight"] = torch.randn(4, 64, generator=gen)
            extra[f"{base}.lora_B.weight"] = torch.randn(out, 4, generator=gen)
    return extra


# name -> (write_variant kwargs, source flavours inspect must report)
VARIANTS: dict[str, tuple[dict, set[str]]] = {
    "peft-all-linear": ({}, {"peft-all-linear"}),
    "default-adapter-names": ({"rename": default_adapter_name}, {"adapter-name-in-keys"}),
    "no-prefix": ({"rename": lambda k: no_prefix(default_adapter_name(k))}, {"no-peft-prefix", "adapter-name-in-keys"}),
    "custom-clippable": (
        {"rename": drop_tower_linear, "config_update": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "post", "linear_start"]}},
        {"custom-clippable"},
    ),
    "regex-target-modules": ({"config_update": {"target_modules": r".*\.(q_proj|k_proj|v_proj|o_proj|.*proj.*|linear.*|post)"}}, {"regex-target-modules"}),
    "kv-shared-extras": ({"extra": _kv_shared_extras()}, {"kv-shared-extras"}),
    "pickle-bin": ({"rename": lambda k: no_prefix(default_adapter_name(k)), "as_pickle": True}, {"pickle"}),
    "vllm-naming": ({"rename": _vllm_naming}, {"vllm-naming"}),
}


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, all_linear_adapter: Path) -> dict:
    """What stock PEFT makes of the original all-linear adapter: deltas and logits."""
    from peft import PeftModel

    inputs = mm_inputs(tiny_dir)
    model = PeftModel.from_pretrained(load_tiny_model(tiny_dir), all_linear_adapter)
    base_logits = all_logits(load_tiny_model(tiny_dir), inputs)
    return {
        "deltas": peft_deltas(tiny_dir, all_linear_adapter),
        "logits": all_logits(model, inputs),
        "base_logits": base_logits,
        "inputs": inputs,
        "keys": set(load_file(all_linear_adapter / "adapter_model.safetensors")),
    }


@pytest.fixture(scope="module")
def converted(tiny_dir: Path, all_linear_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """variant -> (converted dir, plan)."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for name, (kwargs, _) in VARIANTS.items():
        src = all_linear_adapter if not kwargs else write_variant(all_linear_adapter, root / f"src-{name}", **kwargs)
        out[name] = (root / f"out-{name}", convert_adapter(src, root / f"out-{name}", base=tiny_dir))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_deltas_equal_source(variant: str, converted: dict, reference: dict) -> None:
    out, plan = converted[variant]
    assert VARIANTS[variant][1] <= set(plan.flavours), plan.flavours
    # Same canonical keys as PEFT's all-linear save, nothing else.
    assert set(load_file(out / "adapter_model.safetensors")) == reference["keys"]
    deltas = file_deltas(out)
    assert deltas.keys() == reference["deltas"].keys()
    worst = max(float((deltas[m] - reference["deltas"][m]).abs().max()) for m in deltas)
    assert worst < 1e-6, worst
    # Not vacuous: each delta is a real change.
    assert min(float(d.abs().max()) for d in deltas.values()) > 1e-3
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(m for m in deltas)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        record = json.loads(f.metadata()["gemma4_bridge"])
    assert record["source_flavours"] == plan.flavours
    if variant == "kv-shared-extras":
        assert len(record["dropped"]) == 8 and all("KV-shared" in d["why"] for d in record["dropped"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_logits_with_stock_peft(variant: str, converted: dict, reference: dict, tiny_dir: Path) -> None:
    """Stock PEFT + transformers on the converted adapter reproduce the original adapter's logits."""
    from peft import PeftModel

    out, _ = converted[variant]
    model = PeftModel.from_pretrained(load_tiny_model(tiny_dir), out)
    logits = all_logits(model, reference["inputs"])
    for kind in ("text", "image", "audio"):
        moved = float((reference["logits"][kind] - reference["base_logits"][kind]).abs().max())
        err = float((logits[kind] - reference["logits"][kind]).abs().max())
        assert moved > 1e-2, f"{kind}: adapter does not move logits ({moved})"
        assert err < 1e-5, f"{variant}/{kind}: logits differ by {err} (adapter moves them by {moved})"


def test_pattern_key_is_peft_matching() -> None:
    """The one rank/alpha pattern matcher (planner and training wrapper) picks what PEFT picks."""
    from peft.utils.other import get_pattern_key

    from gemma4_bridge.converters.peft_config import pattern_key

    patterns = ["q_proj", "linear", r"layers\.0\.self_attn\.k_proj", "vision_tower.encoder.layers.0.mlp.down_proj", r"mlp\.\w+_proj"]
    names = [
        "model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.k_proj",
        "model.language_model.layers.10.self_attn.k_proj", "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear",
        "model.vision_tower.encoder.layers.0.mlp.down_proj", "model.language_model.layers.1.mlp.gate_proj",
        "model.language_model.layers.1.self_attn.o_proj", "xq_proj",
    ]  # fmt: skip
    for name in names:
        peft_key = get_pattern_key(patterns, name)
        assert pattern_key(patterns, name) == (peft_key if peft_key in patterns else None), name
    assert pattern_key(patterns, "model.language_model.layers.1.self_attn.o_proj") is None
    assert pattern_key(patterns, "xq_proj") is None  # a suffix must start at a dot


def test_rank_alpha_patterns_and_rslora_preserved(tiny_dir: Path, tmp_path: Path) -> None:
    """rsLoRA + rank_pattern + alpha_pattern, also when the source names tower wrappers (custom clippable)."""
    src = write_peft_adapter(
        tiny_dir, tmp_path / "patterns", r=4, lora_alpha=8, use_rslora=True, seed=5,
        rank_pattern={"q_proj": 8, "q_proj.linear": 8}, alpha_pattern={"down_proj": 32, "linear": 2},
    )  # fmt: skip
    ref = peft_deltas(tiny_dir, src)
    # This file's own reading of the patterns agrees with PEFT's on the source itself.
    own = file_deltas(src)
    assert max(float((own[m] - ref[m]).abs().max()) for m in ref) < 1e-5
    # The custom clippable-layer flavour: tower keys lack '.linear' and patterns name the wrapper.
    custom = write_variant(
        src, tmp_path / "custom", rename=lambda k: drop_tower_linear(default_adapter_name(k)),
        config_update={
            "rank_pattern": {"q_proj": 8},
            "alpha_pattern": {
                "vision_tower.encoder.layers.0.mlp.down_proj": 2,
                "down_proj": 32,
                r"(vision_tower\.encoder|audio_tower)\.layers\.0\.(self_attn\.([qkvo]_proj|post)|mlp\.\w+_proj|"
                r"feed_forward\d\.ffw_layer_\d|lconv1d\.linear_(start|end))": 2,
            },
        },
    )  # fmt: skip
    for source in (src, custom):
        out = convert_adapter(source, tmp_path / f"out-{source.name}", base=tiny_dir)
        out_dir = tmp_path / f"out-{source.name}"
        assert out.modules
        for deltas in (file_deltas(out_dir), peft_deltas(tiny_dir, out_dir)):
            assert deltas.keys() == ref.keys()
            worst = max(float((deltas[m] - ref[m]).abs().max()) for m in ref)
            assert worst < 1e-5, (source.name, worst)
        config = json.loads((out_dir / "adapter_config.json").read_text())
        assert config["use_rslora"] is True
        assert config["rank_pattern"]["model.vision_tower.encoder.layers.0.self_attn.q_proj.linear"] == 8
        assert config["alpha_pattern"]["model.language_model.layers.0.mlp.down_proj"] == 32



def test_patterns_in_canonical_names_survive_renamed_tensors(tiny_dir: Path, tmp_path: Path) -> None:
    """An adapter whose patterns name modules by their canonical paths (as convert and the training
    wrapper write them) and whose tower tensors were renamed afterwards (no '.linear'): the patterns
    still apply to those modules, said as a fixable problem, not dropped for the default alpha.
    A pattern that names no module is a note (PEFT ignores it too)."""
    from gemma4_bridge.converters.canonical import plan
    from gemma4_bridge.layout import Gemma4Layout

    src = write_peft_adapter(tiny_dir, tmp_path / "patterns", r=4, lora_alpha=8, use_rslora=True, seed=5,
                             rank_pattern={"q_proj.linear": 8}, alpha_pattern={"linear": 2, "down_proj": 32})  # fmt: skip
    ref = peft_deltas(tiny_dir, src)
    convert_adapter(src, tmp_path / "canonical", base=tiny_dir)  # patterns now per module, by canonical path
    config = json.loads((tmp_path / "canonical" / "adapter_config.json").read_text())
    tower_keys = [k for k in config["alpha_pattern"] if "_tower." in k and k.endswith(".linear")]
    assert tower_keys and all(config["alpha_pattern"][k] == 2 for k in tower_keys)
    renamed = write_variant(tmp_path / "canonical", tmp_path / "renamed", rename=drop_tower_linear,
                            config_update={"alpha_pattern": {**config["alpha_pattern"], "no_such_proj": 5}})  # fmt: skip
    p = plan(renamed, Gemma4Layout.from_model_dir(tiny_dir))
    by_code = {}
    for q in p.problems:
        by_code.setdefault(q.code, []).append(q)
    tower_ranks = [k for k in config["rank_pattern"] if "_tower." in k]
    assert len(by_code["pattern-canonical-name"]) == len(tower_keys) + len(tower_ranks)  # one per key applied by its canonical name
    assert [q.severity for q in by_code["unused-pattern"]] == ["note"] and "'no_such_proj'" in by_code["unused-pattern"][0].message
    convert_adapter(renamed, tmp_path / "out", base=tiny_dir)
    got = peft_deltas(tiny_dir, tmp_path / "out")
    assert got.keys() == ref.keys() and max(float((got[m] - ref[m]).abs().max()) for m in ref) < 1e-5

def test_canonicalize_in_memory_matches_disk(tiny_dir: Path, all_linear_adapter: Path) -> None:
    """The plugin entry point: (config, tensors) in, canonical (config, tensors, plan) out, no files."""
    from gemma4_bridge.converters import canonicalize
    from gemma4_bridge.layout import Gemma4Layout

    layout = Gemma4Layout.from_model_dir(tiny_dir)
    raw = load_file(all_linear_adapter / "adapter_model.safetensors")
    hand_saved = {no_prefix(default_adapter_name(drop_tower_linear(k))): v for k, v in raw.items()}
    config = json.loads((all_linear_adapter / "adapter_config.json").read_text())
    new_config, tensors, plan = canonicalize((config, hand_saved), layout)
    assert tensors.keys() == raw.keys()
    assert all(torch.equal(tensors[k], raw[k]) for k in raw)
    assert {"custom-clippable", "no-peft-prefix", "adapter-name-in-keys"} <= set(plan.flavours)
    assert new_config["target_modules"] == sorted({k.removeprefix(PREFIX).rsplit(".", 2)[0] for k in raw})
