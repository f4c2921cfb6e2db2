"""Audio ``relative_k_proj`` LoRA (plugins/vllm/relative_position_lora.py) without an engine: the
upstream contract it relies on, the fidelity of its copy of transformers' audio attention, and the
refusal where the contract does not hold. tests/test_vllm_engine.py serves it at parity per item."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import Gemma4Layout

pytest.importorskip("vllm")
from gemma4_bridge.plugins.vllm import relative_position_lora as rpl  # noqa: E402
from gemma4_bridge.plugins.vllm.adapter import ServingContext, check_adapter  # noqa: E402


@pytest.fixture
def fresh_support() -> Iterator[None]:
    """supported() is cached per process; a test that changes the contract must not leak its answer."""
    rpl.supported.cache_clear()
    yield
    rpl.supported.cache_clear()


@pytest.fixture(scope="module")
def ctx(tiny_dir: Path) -> ServingContext:
    return ServingContext(Gemma4Layout.from_model_dir(tiny_dir), enable_tower_connector_lora=True, max_lora_rank=8)


def test_upstream_contract_holds() -> None:
    """Fails when transformers' audio attention or vLLM's LoRA layer / punica wrapper change shape."""
    assert rpl.verify_upstream() == []
    assert rpl.supported()


def test_contract_check_detects_a_changed_attention(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, fresh_support: None) -> None:
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioAttention

    from gemma4_bridge.testing.fixtures import load_tiny_model

    def forward(self, hidden_states, position_embeddings, attention_mask=None):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        return hidden_states, None

    monkeypatch.setattr(Gemma4AudioAttention, "forward", forward)
    assert any("Gemma4AudioAttention.forward is not a version" in p for p in rpl.verify_upstream())
    tower = load_tiny_model(tiny_dir).model.audio_tower
    assert rpl.install(tower) == 0
    assert all(type(layer.self_attn) is Gemma4AudioAttention for layer in tower.layers)


def test_contract_check_detects_a_changed_vllm(monkeypatch: pytest.MonkeyPatch, fresh_support: None) -> None:
    contract = (*rpl.VLLM_CONTRACT, ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.set_lora", ("self", "slot")))
    monkeypatch.setattr(rpl, "VLLM_CONTRACT", contract)
    assert any("set_lora takes" in p for p in rpl.verify_upstream())
    monkeypatch.setattr(rpl, "STACKED_LAYOUT", ("self.lora_stacked = ",))
    assert any("no longer stacks" in p for p in rpl.verify_upstream())


def test_copied_forward_equals_upstream(tiny_dir: Path) -> None:
    """The per-item attention without LoRA is transformers' own attention, to float32 rounding, on the
    fixture's real audio layer (finite clip bounds) with a padding mask."""
    from gemma4_bridge.testing.fixtures import load_tiny_model

    tower = load_tiny_model(tiny_dir).model.audio_tower
    upstream = tower.layers[0].self_attn
    ours = copy.deepcopy(upstream)
    ours.__class__ = rpl.PerItemRelativeKeysAttention
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 23, tower.config.hidden_size, generator=gen)
    positions = tower.rel_pos_enc(hidden)
    valid = torch.ones(3, 23, dtype=torch.bool)
    valid[1, 17:] = False
    mask = tower._convert_4d_mask_to_blocked_5d(valid[:, None, None, :] & valid[:, None, :, None])
    with torch.no_grad():
        want, _ = upstream(hidden, positions, mask)
        got, _ = ours(hidden, positions, mask)
    assert torch.allclose(got, want, rtol=0, atol=1e-6), float((got - want).abs().max())
    assert rpl.install(tower) == len(tower.layers)
    assert all(type(layer.self_attn) is rpl.PerItemRelativeKeysAttention for layer in tower.layers)


def test_all_linear_adapter_is_served(ctx: ServingContext, all_linear_adapter: Path) -> None:
    plan = check_adapter(all_linear_adapter, ctx)
    assert any(m.site.path.endswith("self_attn.relative_k_proj") for m in plan.modules)


def test_refused_by_name_where_unsupported(
    ctx: ServingContext, all_linear_adapter: Path, monkeypatch: pytest.MonkeyPatch, fresh_support: None
) -> None:
    monkeypatch.setattr(rpl, "UPSTREAM_FORWARD_SHA256", {})
    with pytest.raises(BridgeError, match=r"model\.audio_tower\.layers\.0\.self_attn\.relative_k_proj.*transformers 5\.\d+.*gemma4-bridge merge"):
        check_adapter(all_linear_adapter, ctx)
