"""31B-like dense member (attention_k_eq_v on every full-attention layer, no per-layer embeddings,
vision tower with finite clip bounds, no audio): train, inspect, convert and merge at PEFT's numbers.

The adapter is trained by the wrapper (all-linear: language model, vision tower through its
clippable ``.linear``, connector), one real backward step included, so it is what a user of this
member saves. References are stock PEFT's forward passes on that adapter; merged checkpoints are
loaded by stock transformers. The E-series tests cover the same code paths on another module tree;
these pin the member itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from convert_helpers import default_adapter_name, drop_tower_linear, write_variant
from family_helpers import logits, peft_logits, text_and_image_inputs
from peft import LoraConfig, get_peft_model

from gemma4_bridge.converters.canonical import plan
from gemma4_bridge.converters.convert import convert_adapter
from gemma4_bridge.converters.inspect import inspect_adapter
from gemma4_bridge.converters.merge import merge_adapter
from gemma4_bridge.layout import Gemma4Layout
from gemma4_bridge.testing.family import build_family_member, family_spec, load_family_model
from gemma4_bridge.train import lora_config, prepare_model, save_adapter


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_member(tmp_path_factory.mktemp("dense") / "model", family_spec("dense"))


@pytest.fixture(scope="module")
def inputs(dense_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return text_and_image_inputs(dense_dir)


@pytest.fixture(scope="module")
def trained(dense_dir: Path, inputs, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The wrapper's all-linear adapter after one optimizer step, with the trained model's logits."""
    model = prepare_model(load_family_model(dense_dir))
    peft_model = get_peft_model(model, lora_config(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B starts at zero: give it a value so the step moves A as well
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=gen)
    peft_model.train()
    batch = inputs["image"]
    loss = peft_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    k_grad = peft_model.get_parameter(f"base_model.model.model.language_model.layers.{FULL}.self_attn.k_proj.lora_A.default.weight").grad
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.grad is not None:
                param.sub_(1.0 * param.grad)
    peft_model.eval()
    out = save_adapter(peft_model, tmp_path_factory.mktemp("adapters") / "trained")
    return {"dir": out, "k_grad": k_grad, "logits": logits(peft_model, inputs)}


FULL = 1  # the tiny member's first full-attention layer: k_eq_v (V is the k_proj output)


def test_layout_reads_the_dense_member(dense_dir: Path) -> None:
    layout = Gemma4Layout.from_model_dir(dense_dir)
    assert layout.towers == ("vision",) and layout.experts == {}
    assert FULL in layout.k_eq_v_layers and len(layout.kv_shared_layers) == family_spec("dense").num_kv_shared_layers
    assert not [p for p in layout.linears if "per_layer" in p]  # no per-layer embeddings
    assert layout.clippable_sites and all("vision_tower" in s for s in layout.clippable_sites)
    assert f"model.language_model.layers.{FULL}.self_attn.v_proj" not in layout.linears


def test_wrapper_trains_k_eq_v_and_saves_canonical(dense_dir: Path, trained: dict, inputs) -> None:
    """The k_proj LoRA of a k_eq_v layer gets a gradient (through K and V); the saved adapter is
    canonical and stock PEFT reloads it to the trained model's logits, text and image."""
    assert trained["k_grad"] is not None and trained["k_grad"].abs().sum() > 0
    report = inspect_adapter(trained["dir"], base=dense_dir)
    assert report.status == "healthy", report.problems
    assert report.summary["modules_per_component"]["vision_tower"] > 0
    base = logits(load_family_model(dense_dir), inputs)
    got = peft_logits(dense_dir, trained["dir"], inputs)
    for kind in inputs:
        assert (trained["logits"][kind] - base[kind]).abs().max() > 0.05  # the adapter matters
        torch.testing.assert_close(got[kind], trained["logits"][kind], atol=1e-5, rtol=0)


def test_damaged_flavour_converts_to_the_trained_numbers(dense_dir: Path, trained: dict, inputs, tmp_path: Path) -> None:
    """Tower keys without '.linear' (a custom clippable layer) and '.default.' adapter names, as other
    tools save them: convert restores the canonical keys and PEFT's logits of the trained model."""
    src = write_variant(trained["dir"], tmp_path / "raw", rename=lambda k: default_adapter_name(drop_tower_linear(k)))
    p = plan(src, Gemma4Layout.from_model_dir(dense_dir))
    assert {"custom-clippable", "adapter-name-in-keys"} <= set(p.flavours) and p.fixable
    convert_adapter(src, tmp_path / "c", base=dense_dir)
    got = peft_logits(dense_dir, tmp_path / "c", inputs)
    for kind in inputs:
        torch.testing.assert_close(got[kind], trained["logits"][kind], atol=1e-5, rtol=0)


def test_merge_equals_the_trained_model(dense_dir: Path, trained: dict, inputs, tmp_path: Path) -> None:
    result = merge_adapter(trained["dir"], dense_dir, tmp_path / "merged")
    assert result.merged_weights == len(result.plan.modules)
    merged = logits(load_family_model(tmp_path / "merged"), inputs)
    for kind in inputs:
        torch.testing.assert_close(merged[kind], trained["logits"][kind], atol=1e-4, rtol=0)
