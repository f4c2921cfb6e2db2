"""MoE (26B-A4B-shaped) expert LoRA: layout, inspect, convert and merge, against real PEFT numbers.

References are PEFT's own forward passes (target_parameters ParamWrapper) on the original
adapter; converted adapters are loaded by stock PEFT, merged checkpoints by stock transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from family_helpers import logits, peft_logits, per_expert_form, text_and_image_inputs
from gemma4_bridge.converters.canonical import plan
from gemma4_bridge.converters.convert import convert_adapter
from gemma4_bridge.converters.inspect import inspect_adapter
from gemma4_bridge.converters.merge import merge_adapter
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import Gemma4Layout
from gemma4_bridge.testing.family import (
    EXPERT_PARAMETERS,
    MOE_INTERMEDIATE_SIZE,
    NUM_EXPERTS,
    build_family_member,
    family_spec,
    load_family_model,
    write_family_adapter,
)

# float32 forward of a tiny model: LoRA moves logits by ~1; a converted adapter must match to rounding.
TOL = 1e-5


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_member(tmp_path_factory.mktemp("moe") / "model", family_spec("moe"))


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_member(tmp_path_factory.mktemp("dense") / "model", family_spec("dense"))


@pytest.fixture(scope="session")
def expert_adapter(moe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Attention + dense-MLP LoRA and PEFT target_parameters on both expert parameters."""
    return write_family_adapter(moe_dir, tmp_path_factory.mktemp("adapters") / "experts", target_parameters=EXPERT_PARAMETERS, r=3, lora_alpha=5)


@pytest.fixture(scope="session")
def inputs(moe_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return text_and_image_inputs(moe_dir)


@pytest.fixture(scope="session")
def reference(moe_dir: Path, expert_adapter: Path, inputs) -> dict[str, torch.Tensor]:
    return peft_logits(moe_dir, expert_adapter, inputs)


def test_layout_reads_experts_as_3d_parameters(moe_dir: Path) -> None:
    layout = Gemma4Layout.from_model_dir(moe_dir)
    n = len(layout.text_layers)
    assert len(layout.experts) == 2 * n
    gate_up = layout.experts["model.language_model.layers.0.experts.gate_up_proj"]
    down = layout.experts["model.language_model.layers.0.experts.down_proj"]
    assert (gate_up.num_experts, gate_up.out_features, gate_up.in_features) == (NUM_EXPERTS, 2 * MOE_INTERMEDIATE_SIZE, 64)
    assert (down.num_experts, down.out_features, down.in_features) == (NUM_EXPERTS, 64, MOE_INTERMEDIATE_SIZE)
    assert not any("experts" in path for path in layout.linears)  # never mistaken for linears
    assert "model.language_model.layers.0.router.proj" in layout.linears  # the router is a real nn.Linear
    assert len(layout.kv_shared_layers) == family_spec("moe").num_kv_shared_layers and layout.k_eq_v_layers


def test_peft_target_parameters_are_canonical(moe_dir: Path, expert_adapter: Path) -> None:
    keys = load_file(expert_adapter / "adapter_model.safetensors")
    assert "base_model.model.model.language_model.layers.0.experts.base_layer.lora_A.weight" in keys  # PEFT's nesting
    report = inspect_adapter(expert_adapter, base=moe_dir)
    assert not [q for q in report.problems if q.severity == "broken"], report.problems
    p = plan(expert_adapter, Gemma4Layout.from_model_dir(moe_dir))
    assert len(p.experts) == 2 * 5 and all(e.source_form == "peft" for e in p.experts)
    assert all(t.key == t.source_key for t in p.tensors if ".experts." in t.key)


def test_convert_keeps_peft_numbers(moe_dir: Path, expert_adapter: Path, reference, inputs, tmp_path: Path) -> None:
    out = convert_adapter(expert_adapter, tmp_path / "c", base=moe_dir)
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(e.site.path for e in out.experts)
    got = peft_logits(moe_dir, tmp_path / "c", inputs)
    base = logits(load_family_model(moe_dir), inputs)
    for kind in inputs:
        assert (reference[kind] - base[kind]).abs().max() > 0.1  # the adapter (experts included) matters
        torch.testing.assert_close(got[kind], reference[kind], atol=TOL, rtol=0)


def test_expert_lora_alone_moves_logits(moe_dir: Path, tmp_path: Path, inputs) -> None:
    """A converted experts-only adapter is not silently empty: it changes logits as PEFT's does."""
    src = write_family_adapter(moe_dir, tmp_path / "src", target_modules=[], target_parameters=["experts.down_proj"], r=2, lora_alpha=3)
    assert "base_model.model.model.language_model.layers.1.experts.lora_A.weight" in load_file(src / "adapter_model.safetensors")
    convert_adapter(src, tmp_path / "c", base=moe_dir)
    ref, got = peft_logits(moe_dir, src, inputs), peft_logits(moe_dir, tmp_path / "c", inputs)
    base = logits(load_family_model(moe_dir), inputs)
    assert (ref["text"] - base["text"]).abs().max() > 0.05
    torch.testing.assert_close(got["text"], ref["text"], atol=TOL, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-gate_up", "gate+up"])
def test_per_expert_forms_convert_to_peft_numbers(moe_dir: Path, expert_adapter: Path, reference, inputs, tmp_path: Path, fused: bool) -> None:
    src = per_expert_form(expert_adapter, tmp_path / "per_expert", NUM_EXPERTS, fused_gate_up=fused)
    p = plan(src, Gemma4Layout.from_model_dir(moe_dir))
    assert "per-expert-lora" in p.flavours and len(p.experts) == 10 and p.fixable
    assert {e.rank for e in p.experts if e.site.param == "gate_up_proj"} == ({3} if fused else {6})  # gate+up: block-diagonal
    convert_adapter(src, tmp_path / "c", base=moe_dir)
    got = peft_logits(moe_dir, tmp_path / "c", inputs)
    for kind in inputs:
        torch.testing.assert_close(got[kind], reference[kind], atol=TOL, rtol=0)


def test_per_expert_subset_gets_zero_for_missing_experts(moe_dir: Path, expert_adapter: Path, tmp_path: Path) -> None:
    src = per_expert_form(expert_adapter, tmp_path / "subset", NUM_EXPERTS, fused_gate_up=True, experts={1, 3})
    convert_adapter(src, tmp_path / "c", base=moe_dir)
    tensors = load_file(tmp_path / "c" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    a = tensors["base_model.model.model.language_model.layers.2.experts.lora_A.weight"]
    b = tensors["base_model.model.model.language_model.layers.2.experts.lora_B.weight"]
    scaling = config["lora_alpha"] / config["r"]
    delta = scaling * torch.einsum("ore,eri->eoi", b.reshape(b.shape[0], -1, NUM_EXPERTS), a.reshape(NUM_EXPERTS, -1, a.shape[1]))
    src_t = load_file(src / "adapter_model.safetensors")
    for e in range(NUM_EXPERTS):
        key = f"base_model.model.model.language_model.layers.2.experts.{e}.down_proj"
        want = scaling * src_t[f"{key}.lora_B.weight"] @ src_t[f"{key}.lora_A.weight"] if e in (1, 3) else torch.zeros_like(delta[e])
        torch.testing.assert_close(delta[e], want, atol=1e-6, rtol=0)


def test_merge_streams_into_3d_expert_weights(moe_dir: Path, expert_adapter: Path, reference, inputs, tmp_path: Path) -> None:
    """The merged checkpoint is the model PEFT's own merge_and_unload makes (< 1e-5; measured <= 5e-7),
    and as close to the unmerged adapter as that one is: a merged MoE differs from the unmerged one by
    float rounding that the routing amplifies (PEFT's own merge: up to 1.2e-4 in logits on some seeds)."""
    from peft import PeftModel

    result = merge_adapter(expert_adapter, moe_dir, tmp_path / "merged")
    assert result.merged_weights == len(result.plan.modules) + 10  # linears + 10 expert parameters
    assert len(result.plan.experts) == 10
    merged = logits(load_family_model(tmp_path / "merged"), inputs)
    peft_merged = logits(PeftModel.from_pretrained(load_family_model(moe_dir), expert_adapter).merge_and_unload().eval(), inputs)
    for kind in inputs:
        torch.testing.assert_close(merged[kind], peft_merged[kind], atol=1e-5, rtol=0)
        peft_gap = float((peft_merged[kind] - reference[kind]).abs().max())
        assert float((merged[kind] - reference[kind]).abs().max()) <= peft_gap + 1e-5 < 1e-3


def test_expert_lora_on_a_dense_base_is_refused(dense_dir: Path, expert_adapter: Path, tmp_path: Path) -> None:
    report = inspect_adapter(expert_adapter, base=dense_dir)
    assert report.exit_code == 3
    bad = [q for q in report.problems if q.code == "unknown-module"]
    assert any("MoE experts" in q.message and "26B-A4B" in q.message for q in bad)
    with pytest.raises(BridgeError, match="MoE experts"):
        convert_adapter(expert_adapter, tmp_path / "c", base=dense_dir)
    assert not (tmp_path / "c").exists()


def test_wrong_expert_count_is_a_shape_mismatch(moe_dir: Path, expert_adapter: Path, tmp_path: Path) -> None:
    src = per_expert_form(expert_adapter, tmp_path / "per_expert", NUM_EXPERTS, fused_gate_up=True)
    tensors = load_file(src / "adapter_model.safetensors")
    extra = {k.replace(".experts.3.", f".experts.{NUM_EXPERTS}."): v.clone() for k, v in tensors.items() if ".experts.3." in k}
    from safetensors.torch import save_file

    save_file({**tensors, **extra}, src / "adapter_model.safetensors")
    report = inspect_adapter(src, base=moe_dir)
    assert report.exit_code == 3 and any(q.code == "shape-mismatch" and f"expert {NUM_EXPERTS}" in q.message for q in report.problems)


def test_inspect_predicts_serving_refusal(moe_dir: Path, expert_adapter: Path) -> None:
    verdicts = {v.server: v for v in inspect_adapter(expert_adapter, base=moe_dir).verdicts}
    plugin = verdicts["vLLM + gemma4-bridge plugin"]
    assert plugin.status == "fails" and any("gemma4-bridge merge" in n for n in plugin.notes)
    assert verdicts["SGLang 0.5.23 (stock)"].status == "fails"


def test_sglang_refuses_expert_lora_by_name(moe_dir: Path, expert_adapter: Path) -> None:
    """SGLang's Gemma 4 LoRA covers qkv/o/gate_up/down linears: expert LoRA must fail, not vanish."""
    from gemma4_bridge.plugins.sglang.adapter import prepare_adapter

    with pytest.raises(BridgeError, match=r"MoE expert parameters.*gemma4-bridge merge"):
        prepare_adapter(expert_adapter, Gemma4Layout.from_model_dir(moe_dir))


def test_per_expert_ranks_and_scalings_differ(moe_dir: Path, expert_adapter: Path, reference, inputs, tmp_path: Path) -> None:
    """Exporters may give an expert its own rank (rank_pattern) and alpha (alpha_pattern): the
    canonical form pads lower ranks with zeros and folds the differing scaling into lora_B."""
    from safetensors.torch import save_file

    src = per_expert_form(expert_adapter, tmp_path / "per_expert", NUM_EXPERTS, fused_gate_up=True)
    tensors = load_file(src / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    # Expert 2's down_proj as rank r+1 (one extra zero component) with alpha 3: same delta once
    # lora_B carries the scaling ratio.
    new_r, new_alpha = r + 1, 3
    ratio = (alpha / r) / (new_alpha / new_r)
    for layer in range(5):
        key = f"base_model.model.model.language_model.layers.{layer}.experts.2.down_proj"
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        tensors[f"{key}.lora_A.weight"] = torch.cat([a, torch.randn(1, a.shape[1])]).contiguous()
        tensors[f"{key}.lora_B.weight"] = torch.cat([b.double() * ratio, torch.zeros(b.shape[0], 1, dtype=torch.float64)], 1).float().contiguous()
    config["rank_pattern"] = {r"experts\.2\.down_proj": new_r}
    config["alpha_pattern"] = {r"experts\.2\.down_proj": new_alpha}
    (src / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, src / "adapter_model.safetensors")
    p = plan(src, Gemma4Layout.from_model_dir(moe_dir))
    assert "per-expert-scalings" in p.flavours and any(q.code == "rescaled-experts" for q in p.problems)
    assert {e.rank for e in p.experts if e.site.param == "down_proj"} == {new_r}  # padded to the largest rank
    convert_adapter(src, tmp_path / "c", base=moe_dir)
    got = peft_logits(moe_dir, tmp_path / "c", inputs)
    for kind in inputs:
        torch.testing.assert_close(got[kind], reference[kind], atol=1e-4, rtol=0)
