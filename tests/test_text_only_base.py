"""A text-only base: a ``Gemma4ForCausalLM`` checkpoint (model_type ``gemma4_text``), whose modules are
``model.layers.N...`` rather than ``model.language_model.layers.N...``.

Canonical keys and ``target_modules`` must name the modules of *that* class, or stock PEFT finds no
target ("Target modules ... not found") and merge looks for tensors the checkpoint does not have.
Adapters arrive in either naming (trained on the text-only class, or on the multimodal one); both
convert to the causal-LM naming and give PEFT's logits; merge equals PEFT's merge_and_unload.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_helpers import all_logits, dir_digest, write_variant
from safetensors import safe_open

from gemma4_bridge.cli import main
from gemma4_bridge.fixtures import build_tiny_gemma4, load_tiny_model, variant, write_peft_adapter


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KV sharing and k_eq_v on, as in the multimodal fixture, but saved as Gemma4ForCausalLM."""
    spec = variant(causal_lm=True, vision=False, audio=False)
    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny_causal") / "model", spec)


@pytest.fixture(scope="module")
def causal_adapter(causal_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peft_adapter(causal_dir, tmp_path_factory.mktemp("causal_adapter") / "a", seed=4)


@pytest.fixture(scope="module")
def inputs() -> dict[str, dict[str, torch.Tensor]]:
    ids = torch.tensor([[2, 17, 301, 45, 99, 7, 260, 13, 88, 410]])
    return {"text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}


def _keys(adapter: Path) -> list[str]:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def _peft_logits(model_dir: Path, adapter: Path, inputs: dict, merge: bool = False) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_tiny_model(model_dir), adapter)
    return all_logits(model.merge_and_unload() if merge else model, inputs)["text"]


@pytest.mark.parametrize("naming", ["causal_lm", "multimodal"])
def test_convert_keeps_the_causal_lm_naming(naming, causal_dir, causal_adapter, inputs, tmp_path) -> None:
    source = causal_adapter
    if naming == "multimodal":  # trained on Gemma4ForConditionalGeneration's language model
        source = write_variant(causal_adapter, tmp_path / "mm", rename=lambda k: k.replace("base_model.model.model.", "base_model.model.model.language_model."))
        assert all(".language_model." in k for k in _keys(source))
    out = tmp_path / "out"
    assert main(["convert", str(source), "-o", str(out), "--base", str(causal_dir)]) == 0
    assert _keys(out) == _keys(causal_adapter)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] and not [t for t in config["target_modules"] if not t.startswith("model.") or "language_model" in t]
    assert main(["inspect", str(out), "--base", str(causal_dir)]) == 0  # healthy: nothing left to fix
    reference = _peft_logits(causal_dir, causal_adapter, inputs)
    base = all_logits(load_tiny_model(causal_dir), inputs)["text"]
    assert float((reference - base).abs().max()) > 1e-2  # the adapter moves the logits
    got = _peft_logits(causal_dir, out, inputs)  # stock PEFT, loading the converted adapter
    assert torch.allclose(got, reference, atol=1e-5), float((got - reference).abs().max())


def test_merge_into_causal_lm_checkpoint(causal_dir, causal_adapter, inputs, tmp_path) -> None:
    before = dir_digest(causal_dir)
    out = tmp_path / "merged"
    assert main(["merge", str(causal_adapter), "--base", str(causal_dir), "-o", str(out)]) == 0
    assert dir_digest(causal_dir) == before
    merged = all_logits(load_tiny_model(out), inputs)["text"]
    reference = _peft_logits(causal_dir, causal_adapter, inputs, merge=True)
    assert torch.allclose(merged, reference, atol=1e-5), float((merged - reference).abs().max())
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4_text"
