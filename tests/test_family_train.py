"""Training wrapper on the MoE member: experts via PEFT target_parameters, saved canonical, reloaded by PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from gemma4_bridge.converters.inspect import inspect_adapter
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.testing.family import EXPERT_PARAMETERS, TEXT_LINEARS, build_family_member, family_spec, load_family_model
from gemma4_bridge.train import lora_config, prepare_model, save_adapter


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_member(tmp_path_factory.mktemp("moe_train") / "model", family_spec("moe"))


def test_experts_trained_and_saved_canonical(moe_dir: Path, tmp_path: Path) -> None:
    model = prepare_model(load_family_model(moe_dir))
    cfg = lora_config(model, LoraConfig(r=2, lora_alpha=4, target_modules=TEXT_LINEARS, target_parameters=EXPERT_PARAMETERS,
                                        rank_pattern={"experts.down_proj": 3}))  # fmt: skip
    assert cfg.target_parameters == sorted(f"model.language_model.layers.{i}.experts.{p}" for i in range(5) for p in ("gate_up_proj", "down_proj"))
    assert cfg.rank_pattern["model.language_model.layers.0.experts.down_proj"] == 3
    peft_model = get_peft_model(model, cfg)
    ids = torch.tensor([[2, 40, 41, 42, 43, 50, 60, 70]])
    with torch.no_grad():  # B starts at zero: give the expert LoRA a value so gradients reach A too
        for name, param in peft_model.named_parameters():
            if "experts" in name and "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "experts" in n and "lora_" in n}
    assert len(grads) == 4 * 5 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    peft_model.eval()
    out = save_adapter(peft_model, tmp_path / "adapter")
    report = inspect_adapter(out, base=moe_dir)
    assert report.status == "healthy", report.problems
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = PeftModel.from_pretrained(load_family_model(moe_dir), out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_target_parameters_outside_experts_refused(moe_dir: Path) -> None:
    model = load_family_model(moe_dir)
    with pytest.raises(BridgeError, match="router.scale"):
        lora_config(model, LoraConfig(target_modules=TEXT_LINEARS, target_parameters=["router.scale"]))
    with pytest.raises(BridgeError, match="lora_dropout"):
        lora_config(model, LoraConfig(target_modules=TEXT_LINEARS, target_parameters=EXPERT_PARAMETERS, lora_dropout=0.1))


def test_unified_all_linear_includes_embedders_and_saves_canonical(tmp_path: Path) -> None:
    """12B Unified: 'all-linear' reaches its encoder-free embedders (plain linears, nothing to
    clamp); the saved adapter is canonical and stock PEFT reloads it to the same logits."""
    model_dir = build_family_member(tmp_path / "unified", family_spec("unified"))
    model = prepare_model(load_family_model(model_dir))
    cfg = lora_config(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    embedders = {"model.embed_vision.patch_dense", "model.embed_vision.multimodal_embedder.embedding_projection", "model.embed_audio.embedding_projection"}
    assert embedders <= set(cfg.target_modules)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    out = save_adapter(peft_model, tmp_path / "adapter")
    assert inspect_adapter(out, base=model_dir).status == "healthy"
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = PeftModel.from_pretrained(load_family_model(model_dir), out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
