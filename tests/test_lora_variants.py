"""An adapter trained from a base-modifying init (PiSSA) is refused until PEFT converts it, with numbers.

PiSSA (``init_lora_weights="pissa"``) subtracts the initial ``s * B0 @ A0`` (the top singular
directions) from each target's base weight before training, so the trained model is
``W - s B0 A0 + s B A``. PEFT recomputes that residual when it loads the adapter; a merge or a
server applying ``s B A`` to ``W`` is off by ``s B0 A0``. PEFT's ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)`` rewrites it as a plain rank-2r LoRA of ``W``: that
one is accepted and merges to the trained model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_helpers import all_logits, dir_digest, mm_inputs

from gemma4_bridge.cli import main
from gemma4_bridge.testing.fixtures import load_tiny_model

TARGETS = r".*language_model.*\.(q_proj|o_proj)"


@pytest.fixture(scope="module")
def pissa(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("pissa")
    model = get_peft_model(load_tiny_model(tiny_dir), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    model.save_pretrained(out / "initial")  # A0, B0: what the conversion subtracts
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training": move every factor away from its init
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(out / "raw")
    model.save_pretrained(out / "converted", path_initial_model_for_weight_conversion=str(out / "initial"))
    inputs = {"text": mm_inputs(tiny_dir)["text"]}
    model.eval()
    naive = load_tiny_model(tiny_dir)  # what applying s * B @ A to the original weights gives
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                path = name.removeprefix("base_model.model.")
                naive.get_submodule(path).weight += module.get_delta_weight("default")
    return {"dir": out, "inputs": inputs, "trained": all_logits(model, inputs)["text"], "naive": all_logits(naive, inputs)["text"]}


def test_plain_lora_reading_would_be_wrong(pissa: dict) -> None:
    """The refusal is needed: s * B @ A on the original weights is not the trained model."""
    assert (pissa["naive"] - pissa["trained"]).abs().max().item() > 0.05  # measured 0.66


def test_unconverted_adapter_is_refused_by_inspect_and_merge(capsys, pissa: dict, tiny_dir: Path) -> None:
    raw = pissa["dir"] / "raw"
    assert json.loads((raw / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    before = dir_digest(raw)
    rc = main(["inspect", str(raw), "--base", str(tiny_dir), "--json"])
    report = json.loads(capsys.readouterr().out)
    problem = next(p for p in report["problems"] if p["code"] == "base-modifying-init")
    assert rc == 3 and "path_initial_model_for_weight_conversion" in problem["fix"]
    assert all(v["status"] == "fails" for v in report["verdicts"]), report["verdicts"]
    out = pissa["dir"] / "raw-merged"
    rc = main(["merge", str(raw), "--base", str(tiny_dir), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "init_lora_weights='pissa'" in err and "Fix:" in err, err
    assert not out.exists() and dir_digest(raw) == before


def test_converted_adapter_merges_to_the_trained_model(capsys, pissa: dict, tiny_dir: Path) -> None:
    converted = pissa["dir"] / "converted"
    config = json.loads((converted / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # PEFT's conversion: plain LoRA, rank 2r
    out = pissa["dir"] / "converted-merged"
    assert main(["merge", str(converted), "--base", str(tiny_dir), "-o", str(out)]) == 0, capsys.readouterr().err
    merged = all_logits(load_tiny_model(out), pissa["inputs"])["text"]
    assert (merged - pissa["trained"]).abs().max().item() < 1e-4  # measured 7e-6


def test_readme_recipe_converts_an_adapter_whose_init_was_not_saved(pissa: dict, tiny_dir: Path, tmp_path: Path) -> None:
    """The README's route for an unconverted PiSSA adapter without its initial adapter: recreate the
    init from the same config, load the trained adapter, let PEFT convert it; it then merges to the
    trained model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    init = get_peft_model(load_tiny_model(tiny_dir), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    init.save_pretrained(tmp_path / "initial")
    trained = PeftModel.from_pretrained(load_tiny_model(tiny_dir), pissa["dir"] / "raw")
    trained.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert main(["merge", str(tmp_path / "converted"), "--base", str(tiny_dir), "-o", str(tmp_path / "merged")]) == 0
    merged = all_logits(load_tiny_model(tmp_path / "merged"), pissa["inputs"])["text"]
    assert (merged - pissa["trained"]).abs().max().item() < 1e-4


def test_trainable_tokens_are_refused_by_name(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    """PEFT's trainable tokens (new rows of the tied embedding table, as values) are not LoRA: refused
    everywhere by their own name and fix, not as an unknown tensor or as modules_to_save."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_tiny_model(tiny_dir), LoraConfig(r=4, target_modules=TARGETS, trainable_token_indices={"embed_tokens": [3, 5]}))
    model.save_pretrained(tmp_path / "tokens")
    before = dir_digest(tmp_path / "tokens")
    rc = main(["inspect", str(tmp_path / "tokens"), "--base", str(tiny_dir), "--json"])
    report = json.loads(capsys.readouterr().out)
    found = [p for p in report["problems"] if p["code"] == "trainable-tokens"]
    assert rc == 3 and len(found) == 2, report["problems"]  # the config's field and the saved tensor
    assert any(t.endswith("trainable_tokens_delta") for p in found for t in p["tensors"])
    assert all("merge_and_unload" in p["fix"] for p in found)
    assert all(v["status"] == "fails" for v in report["verdicts"]), report["verdicts"]
    rc = main(["convert", str(tmp_path / "tokens"), "--base", str(tiny_dir), "-o", str(tmp_path / "out")])
    assert rc == 2 and "trainable_token_indices" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and dir_digest(tmp_path / "tokens") == before
