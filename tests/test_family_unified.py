"""12B Unified (``gemma4_unified``): layout from its own module tree, inspect / convert / merge at PEFT's numbers.

Unified has no towers: images are raw patches through ``embed_vision.patch_dense`` and
``embed_vision.multimodal_embedder.embedding_projection``, audio raw frames through
``embed_audio.embedding_projection`` (plain ``nn.Linear``). Its checkpoint stores two of them under
older names (``model.vision_embedder.patch_dense``, ``model.embed_vision.embedding_projection``),
which transformers renames on load: PEFT keys use module names, merge must write checkpoint names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_helpers import logits, peft_logits
from safetensors import safe_open

from gemma4_bridge.converters.convert import convert_adapter
from gemma4_bridge.converters.inspect import inspect_adapter
from gemma4_bridge.converters.merge import merge_adapter
from gemma4_bridge.testing.fixtures import MULTIMODAL_TOKENS, TOKEN_IDS
from gemma4_bridge.layout import Gemma4Layout
from gemma4_bridge.testing.family import AUDIO_EMBED_DIM, build_family_member, family_spec, load_family_model, write_family_adapter

UNIFIED_TARGETS = r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|patch_dense|embedding_projection)"


@pytest.fixture(scope="module")
def unified_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_member(tmp_path_factory.mktemp("unified") / "model", family_spec("unified"))


@pytest.fixture(scope="module")
def unified_adapter(unified_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_family_adapter(unified_dir, tmp_path_factory.mktemp("adapters") / "unified", target_modules=UNIFIED_TARGETS, seed=6)


@pytest.fixture(scope="module")
def inputs() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    image, audio = TOKEN_IDS[MULTIMODAL_TOKENS["image_token"]], TOKEN_IDS[MULTIMODAL_TOKENS["audio_token"]]
    patches, frames = 6, 5
    return {
        "text": {"input_ids": torch.tensor([[2, 40, 41, 42, 43, 50, 60, 70]])},
        "image": {
            "input_ids": torch.tensor([[2, 40, 41, *[image] * patches, 42, 43]]),
            "pixel_values": torch.rand(1, patches, 192, generator=gen),
            "image_position_ids": torch.tensor([[[x, y] for y in range(2) for x in range(3)]]),
        },
        "audio": {
            "input_ids": torch.tensor([[2, 40, *[audio] * frames, 42]]),
            "input_features": torch.randn(1, frames, AUDIO_EMBED_DIM, generator=gen),
            "input_features_mask": torch.ones(1, frames, dtype=torch.bool),
        },
    }


def test_layout_reads_unified_module_tree(unified_dir: Path) -> None:
    layout = Gemma4Layout.from_model_dir(unified_dir)
    assert layout.towers == () and layout.clippable_sites == ()
    patch = layout.linears["model.embed_vision.patch_dense"]
    proj = layout.linears["model.embed_vision.multimodal_embedder.embedding_projection"]
    audio = layout.linears["model.embed_audio.embedding_projection"]
    assert (patch.component, patch.in_features, patch.checkpoint_path) == ("embed_vision", 192, "model.vision_embedder.patch_dense")
    assert proj.checkpoint_path == "model.embed_vision.embedding_projection" and proj.model_path == proj.path
    assert (audio.in_features, audio.checkpoint_path) == (AUDIO_EMBED_DIM, audio.path)
    assert layout.kv_shared_layers == (3, 4) and layout.k_eq_v_layers == (1,)


def test_peft_adapter_is_canonical_and_converts_at_peft_numbers(unified_dir: Path, unified_adapter: Path, inputs, tmp_path: Path) -> None:
    report = inspect_adapter(unified_adapter, base=unified_dir)
    assert not [q for q in report.problems if q.severity == "broken"], report.problems
    assert report.summary["modules_per_component"]["embed_vision"] == 2 and report.summary["modules_per_component"]["embed_audio"] == 1
    convert_adapter(unified_adapter, tmp_path / "c", base=unified_dir)
    ref, got = peft_logits(unified_dir, unified_adapter, inputs), peft_logits(unified_dir, tmp_path / "c", inputs)
    base = logits(load_family_model(unified_dir), inputs)
    for kind in inputs:
        assert (ref[kind] - base[kind]).abs().max() > 0.1
        torch.testing.assert_close(got[kind], ref[kind], atol=1e-5, rtol=0)


def test_merge_writes_checkpoint_names(unified_dir: Path, unified_adapter: Path, inputs, tmp_path: Path) -> None:
    result = merge_adapter(unified_adapter, unified_dir, tmp_path / "merged")
    assert result.merged_weights == len(result.plan.modules)
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f, safe_open(unified_dir / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())
        assert not torch.equal(f.get_tensor("model.vision_embedder.patch_dense.weight"), g.get_tensor("model.vision_embedder.patch_dense.weight"))
    ref = peft_logits(unified_dir, unified_adapter, inputs)
    merged = logits(load_family_model(tmp_path / "merged"), inputs)
    for kind in inputs:
        torch.testing.assert_close(merged[kind], ref[kind], atol=1e-4, rtol=0)
