"""Audio ``relative_k_proj`` LoRA (plugins/vllm/relative_position_lora.py) without an engine: the
upstream contract it relies on, the attention left as transformers' own without a delta, and the
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
    """An attention that reads the relative keys anywhere else (here: a second use) is not served."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioAttention

    from gemma4_bridge.testing.fixtures import load_tiny_model

    def forward(self, hidden_states, position_embeddings, attention_mask=None):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        relative_key_states = self.relative_k_proj(position_embeddings)
        return hidden_states + relative_key_states.mean(), None

    monkeypatch.setattr(Gemma4AudioAttention, "forward", forward)
    assert any("handles the relative keys differently" in p for p in rpl.verify_upstream())
    tower = load_tiny_model(tiny_dir).model.audio_tower
    assert rpl.install(tower) == 0
    assert all(type(layer.self_attn) is Gemma4AudioAttention for layer in tower.layers)


def test_contract_check_detects_a_changed_vllm(monkeypatch: pytest.MonkeyPatch, fresh_support: None) -> None:
    contract = (*rpl.VLLM_CONTRACT, ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.set_lora", ("self", "slot")))
    monkeypatch.setattr(rpl, "VLLM_CONTRACT", contract)
    assert any("set_lora takes" in p for p in rpl.verify_upstream())
    monkeypatch.setattr(rpl, "VLLM_SOURCE_FACTS", (("vllm.lora.utils", "from_layer", "for lora_cls in LORA_REGISTRY:"),))
    assert any("from_layer no longer has" in p for p in rpl.verify_upstream())


def test_per_item_attention_without_lora_is_upstream(tiny_dir: Path) -> None:
    """Without a LoRA layer (or with no adapter delta) the per-item attention is transformers' own,
    bitwise, on the fixture's real audio layers with a padding mask; install marks each
    relative_k_proj for the plugin's LoRA layer and registers that class with vLLM first."""
    import vllm.lora.utils as lora_utils

    from gemma4_bridge.testing.fixtures import load_tiny_model

    tower = load_tiny_model(tiny_dir).model.audio_tower
    upstream = copy.deepcopy(tower)
    assert rpl.install(tower) == len(tower.layers)
    assert all(type(layer.self_attn) is rpl.PerItemRelativeKeysAttention for layer in tower.layers)
    assert rpl.RelativePositionLinearWithLoRA.can_replace_layer(tower.layers[0].self_attn.relative_k_proj, None, [])
    assert not rpl.RelativePositionLinearWithLoRA.can_replace_layer(tower.layers[0].self_attn.q_proj.linear, None, [])
    assert lora_utils._all_lora_classes[0] is rpl.RelativePositionLinearWithLoRA
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 96, tower.config.subsampling_conv_channels[0], generator=gen)
    mask = torch.ones(2, 96, dtype=torch.bool)
    mask[1, 70:] = False
    with torch.no_grad():
        want = upstream(features, mask).last_hidden_state
        got = tower(features, mask).last_hidden_state
    assert torch.equal(got, want)


def test_all_linear_adapter_is_served(ctx: ServingContext, all_linear_adapter: Path) -> None:
    plan = check_adapter(all_linear_adapter, ctx)
    assert any(m.site.path.endswith("self_attn.relative_k_proj") for m in plan.modules)


def test_refused_by_name_where_unsupported(
    ctx: ServingContext, all_linear_adapter: Path, monkeypatch: pytest.MonkeyPatch, fresh_support: None
) -> None:
    monkeypatch.setattr(rpl, "FORWARD_FACTS", rpl.FORWARD_FACTS[1:])
    with pytest.raises(BridgeError, match=r"model\.audio_tower\.layers\.0\.self_attn\.relative_k_proj.*transformers 5\.\d+.*gemma4-bridge merge"):
        check_adapter(all_linear_adapter, ctx)
