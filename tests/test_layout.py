"""The layout model against the instantiated transformers model: every derived fact is checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from gemma4_bridge.errors import BridgeError
from gemma4_bridge.testing.fixtures import load_tiny_model
from gemma4_bridge.layout import Absence, Gemma4Layout


def _model_facts(model) -> tuple[dict, dict, dict]:
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linears.pop("lm_head")  # tied to embed_tokens, never a separate checkpoint tensor
    clippable = {n for n, m in model.named_modules() if type(m).__name__ == "Gemma4ClippableLinear"}
    attn = {
        n: m
        for n, m in model.named_modules()
        if type(m).__name__ == "Gemma4TextAttention"
    }
    return linears, clippable, attn


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_text_only_dir", "tiny_no_audio_dir"])
def test_layout_matches_transformers_model(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    layout = Gemma4Layout.from_model_dir(model_dir)
    model = load_tiny_model(model_dir)
    linears, clippable, attn = _model_facts(model)

    assert {p: (s.in_features, s.out_features) for p, s in layout.linears.items()} == linears
    assert set(layout.clippable_sites) == clippable
    for site in layout.linears.values():
        assert site.clippable == (site.wrapper_path in clippable)
        module = model.get_submodule(site.path)
        assert site.has_bias == (module.bias is not None)

    assert len(layout.text_layers) == len(attn)
    for layer in layout.text_layers:
        module = attn[f"model.language_model.layers.{layer.index}.self_attn"]
        assert layer.attention == ("sliding" if module.is_sliding else "full")
        assert layer.head_dim == module.head_dim
        assert (layer.kv_role == "reuse") == module.is_kv_shared_layer
        assert (layer.kv_role == "store") == (module.store_full_length_kv and model.config.text_config.num_kv_shared_layers > 0)
        assert layer.has_k_proj == hasattr(module, "k_proj")
        assert layer.has_v_proj == (getattr(module, "v_proj", None) is not None)
        assert layer.k_eq_v == module.use_alternative_attention

    towers = {t for t in ("vision", "audio") if getattr(model.model, f"{t}_tower", None) is not None}
    assert set(layout.towers) == towers


def test_default_fixture_has_every_hard_feature(tiny_dir: Path) -> None:
    layout = Gemma4Layout.from_model_dir(tiny_dir)
    assert layout.kv_shared_layers == (3, 4)
    assert layout.kv_store_layers == (1, 2)
    assert layout.k_eq_v_layers == (1,)
    assert {layer.head_dim for layer in layout.text_layers} == {32, 64}
    assert layout.towers == ("vision", "audio")
    assert not any(s.token_wise for s in layout.linears.values() if s.path.endswith("relative_k_proj"))
    # finite clip bounds: a lost clamp must change outputs
    model = load_tiny_model(tiny_dir)
    for path in layout.clippable_sites:
        module = model.get_submodule(path)
        assert torch.isfinite(module.input_min) and torch.isfinite(module.output_max), path


def test_reuse_layers_explain_missing_kv(tiny_dir: Path) -> None:
    layout = Gemma4Layout.from_model_dir(tiny_dir)
    kv_shared = layout.missing_site_reason("model.language_model.layers.3.self_attn.k_proj")
    assert kv_shared.code == Absence.KV_SHARED and "KV-shared" in kv_shared.message
    k_eq_v = layout.missing_site_reason("model.language_model.layers.1.self_attn.v_proj")
    assert k_eq_v.code == Absence.K_EQ_V and "k_eq_v" in k_eq_v.message
    assert layout.missing_site_reason("model.language_model.layers.0.self_attn.v_proj").code == Absence.UNKNOWN_MODULE


def test_layout_reads_headers_not_data(tiny_dir: Path, tmp_path: Path) -> None:
    """Only config.json and the safetensors header are needed: a file whose data is garbage still works."""
    src = tiny_dir / "model.safetensors"
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    (tmp_path / "model.safetensors").write_bytes(raw[: 8 + n] + b"\xff" * (len(raw) - 8 - n))
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    assert Gemma4Layout.from_model_dir(tmp_path).linears == Gemma4Layout.from_model_dir(tiny_dir).linears


def test_layout_errors_name_the_file_and_fix(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BridgeError, match=r"no config\.json.*Fix:"):
        Gemma4Layout.from_model_dir(tmp_path)
    config = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(BridgeError, match="not a Gemma 4 model"):
        Gemma4Layout.from_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    raw = (tiny_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BridgeError, match=re.escape(str(tmp_path / "model.safetensors")) + ".*truncated"):
        Gemma4Layout.from_model_dir(tmp_path)
