"""The LoRA buffers SGLang allocates for our class have the real weight shapes, layer by layer.

SGLang's own LoRAManager and memory pool run over our class built on CPU (see conftest.py); the
shapes they ask for are compared with the transformers model's weights (the checkpoint) and with
SGLang's own fused modules (what its LoRA kernels slice). The tiny model has every layer kind:
sliding (head 32) and full (head 64) attention, KV-shared layers 3-4 (no k_proj/v_proj in
transformers, K/V columns kept in SGLang's qkv_proj), k_eq_v full layers (no v_proj), and
use_double_wide_mlp (layers 3-4: 192-wide MLP instead of 96).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sglang_helpers import MAX_LORA_RANK


@pytest.fixture(scope="module")
def hf_model(sg_model_dir: Path) -> Any:
    from gemma4_bridge.testing.fixtures import load_tiny_model

    return load_tiny_model(sg_model_dir)


@pytest.fixture(scope="module")
def pool(served: dict[str, Any]) -> Any:
    """The memory pool of SGLang's LoRA manager over our class, adapters loaded (all four modules)."""
    return served["manager"].memory_pool


def _kv_width(attn: Any) -> int:
    """K/V width transformers computes for a layer (also for KV-shared layers, which have no k_proj)."""
    return attn.head_dim * (attn.config.num_attention_heads // attn.num_key_value_groups)


def test_buffers_match_real_weights_layer_by_layer(pool: Any, hf_model: Any, sg_model: tuple[Any, Any]) -> None:
    model, _ = sg_model
    slot_rank = MAX_LORA_RANK
    layers = hf_model.model.language_model.layers
    seen_kinds = set()
    for i, hf_layer in enumerate(layers):
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        sg_layer = model.language_model.layers[i]
        sg_qkv = sg_layer.self_attn.qkv_proj.base_layer.output_partition_sizes
        sg_gate_up = sg_layer.mlp.gate_up_proj.base_layer.output_partition_sizes
        q_out, kv_out = attn.q_proj.weight.shape[0], _kv_width(attn)
        for present in (getattr(attn, leaf, None) for leaf in ("k_proj", "v_proj")):
            assert present is None or present.weight.shape[0] == kv_out
        expected = {
            # module: (lora_A shape, lora_B shape) for one adapter slot
            "qkv_proj": ((3 * slot_rank, attn.q_proj.weight.shape[1]), (q_out + 2 * kv_out, slot_rank)),
            "o_proj": ((slot_rank, attn.o_proj.weight.shape[1]), (attn.o_proj.weight.shape[0], slot_rank)),
            "gate_up_proj": (
                (2 * slot_rank, mlp.gate_proj.weight.shape[1]),
                (mlp.gate_proj.weight.shape[0] + mlp.up_proj.weight.shape[0], slot_rank),
            ),
            "down_proj": ((slot_rank, mlp.down_proj.weight.shape[1]), (mlp.down_proj.weight.shape[0], slot_rank)),
        }
        for module, (a_shape, b_shape) in expected.items():
            got = (tuple(pool.A_buffer[module][i].shape[1:]), tuple(pool.B_buffer[module][i].shape[1:]))
            assert got == (a_shape, b_shape), f"layer {i} {module}: buffers {got}, real weights {(a_shape, b_shape)}"
        # ... and SGLang's own fused modules (what its kernels slice) agree with the real weights.
        assert sg_qkv == [q_out, kv_out, kv_out], f"layer {i}"
        assert sg_gate_up == [mlp.gate_proj.weight.shape[0], mlp.up_proj.weight.shape[0]], f"layer {i}"
        seen_kinds.add((attn.head_dim, getattr(attn, "k_proj", None) is not None, mlp.down_proj.weight.shape[1]))
    # The fixture really has every layer kind: both head sizes, KV-shared layers, both MLP widths.
    assert {k[0] for k in seen_kinds} == {32, 64}
    assert {k[1] for k in seen_kinds} == {True, False}
    assert {k[2] for k in seen_kinds} == {96, 192}


def test_get_hidden_dim_answers_from_the_checkpoint(sg_model: tuple[Any, Any], hf_model: Any) -> None:
    """The method SGLang calls, checked directly for every module and layer (and refusing unknown ones)."""
    from gemma4_bridge.errors import BridgeError

    model, _ = sg_model
    for i, layer in enumerate(hf_model.model.language_model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert model.get_hidden_dim("o_proj", i) == tuple(reversed(attn.o_proj.weight.shape))
        assert model.get_hidden_dim("down_proj", i) == tuple(reversed(mlp.down_proj.weight.shape))
        assert model.get_hidden_dim("gate_up_proj", i) == (64, 2 * mlp.gate_proj.weight.shape[0])
    with pytest.raises(BridgeError, match="per_layer_input_gate.*--lora-target-modules"):
        model.get_hidden_dim("per_layer_input_gate", 0)


def test_tensor_parallel_wider_than_kv_heads_is_refused(sg_model: tuple[Any, Any]) -> None:
    """SGLang's per-rank qkv LoRA sizing assumes one head size when K/V heads are replicated."""
    from sglang.test.parallel_groups import parallel_scope

    from gemma4_bridge.errors import BridgeError

    model, _ = sg_model
    with parallel_scope(tp_size=2, attn_tp_size=2, tp_rank=0, attn_tp_rank=0, moe_tp_size=2):
        with pytest.raises(BridgeError, match="tensor parallelism 2 > 1 K/V head"):
            model.get_hidden_dim("qkv_proj", 0)
    assert model.get_hidden_dim("qkv_proj", 0) == (64, 128)  # TP 1 again
