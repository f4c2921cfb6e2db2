"""Quantized bases: QLoRA training (bitsandbytes 4-bit) and quantized checkpoints passed as --base.

bitsandbytes stores a 4-bit linear's weight packed ([out * in / 2, 1] uint8), in the model and in
the checkpoint (with its logical shape in a small JSON quant-state tensor). Read as a plain shape,
every linear looked like 1 -> N: the training wrapper refused each QLoRA adapter after the run as
"for another model size", and inspect/convert did the same against a bitsandbytes checkpoint.
The bitsandbytes tests run where it is installed (the newest-releases environment; its 4-bit
layers work on the CPU there).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import randomize_lora
from safetensors.torch import load_file, save_file

from gemma4_bridge.cli import main
from gemma4_bridge.layout import Gemma4Layout

def shapes(layout: Gemma4Layout) -> dict[str, tuple[int, int, bool]]:
    return {p: (s.in_features, s.out_features, s.clippable) for p, s in layout.linears.items()}


@pytest.fixture
def quantized(tiny_dir: Path) -> torch.nn.Module:
    """The tiny base loaded in 4-bit (a fresh one per test: get_peft_model changes it in place)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is installed in the newest-releases environment")
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForImageTextToText.from_pretrained(tiny_dir, quantization_config=q, device_map="cpu", dtype=torch.float32)


def test_qlora_wrapper_reads_the_logical_shapes_and_saves_canonical(quantized, tiny_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from gemma4_bridge.converters.inspect import inspect_adapter
    from gemma4_bridge.train import layout_of, lora_config, prepare_model, save_adapter

    packed = quantized.get_submodule("model.language_model.layers.0.self_attn.q_proj").weight
    assert packed.shape[1] == 1  # the packed storage the layout must see through
    assert shapes(layout_of(quantized)) == shapes(Gemma4Layout.from_model_dir(tiny_dir))
    model = prepare_model(quantized)
    peft_model = get_peft_model(model, lora_config(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    randomize_lora(peft_model, seed=2)
    out = save_adapter(peft_model, tmp_path / "qlora")
    assert inspect_adapter(out, base=tiny_dir).status == "healthy"
    saved = load_file(out / "adapter_model.safetensors")
    trained = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def test_bitsandbytes_checkpoint_as_base(quantized, tiny_dir: Path, all_linear_adapter: Path, tmp_path: Path, capsys) -> None:
    """inspect/convert read the logical shapes from the quant state; merge refuses, naming the fix."""
    qdir = tmp_path / "bnb-4bit"
    quantized.save_pretrained(qdir)
    assert json.loads((qdir / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    assert shapes(Gemma4Layout.from_model_dir(qdir)) == shapes(Gemma4Layout.from_model_dir(tiny_dir))
    assert main(["inspect", str(all_linear_adapter), "--base", str(qdir)]) == 0
    assert main(["convert", str(all_linear_adapter), "--base", str(qdir), "-o", str(tmp_path / "converted")]) == 0
    capsys.readouterr()
    assert main(["merge", str(all_linear_adapter), "--base", str(qdir), "-o", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "bitsandbytes-quantized" in err and "unquantized checkpoint" in err
    assert not (tmp_path / "merged").exists()


def test_packed_format_without_weights_is_refused_by_name(tiny_dir: Path, all_linear_adapter: Path, tmp_path: Path, capsys) -> None:
    """A format whose linears have no '.weight' of their shape (GPTQ's qweight/scales, here written
    by hand): one clear problem instead of every adapter module called unknown; the layout still
    loads (a server on such a base keeps serving requests without an adapter)."""
    qdir = tmp_path / "gptq"
    shutil.copytree(tiny_dir, qdir)
    tensors = load_file(qdir / "model.safetensors")
    packed = {}
    for name, value in tensors.items():
        if value.dim() == 2 and name.endswith("_proj.weight"):
            packed[name.removesuffix("weight") + "qweight"] = value.to(torch.int32)[: max(1, value.shape[0] // 8)]
        else:
            packed[name] = value
    save_file(packed, qdir / "model.safetensors")
    config = json.loads((qdir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (qdir / "config.json").write_text(json.dumps(config))
    assert Gemma4Layout.from_model_dir(qdir).packed_linears
    assert main(["inspect", str(all_linear_adapter), "--base", str(qdir), "--json"]) == 3
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [p["code"] for p in problems] == ["quantized-base"], problems
    assert "gptq-quantized" in problems[0]["message"] and "unquantized checkpoint" in problems[0]["fix"]
    assert main(["convert", str(all_linear_adapter), "--base", str(qdir), "-o", str(tmp_path / "c")]) == 2
    assert "gptq-quantized" in capsys.readouterr().err and not (tmp_path / "c").exists()
