"""merge: streamed, inside the clamp, bf16 kept; logits equal PEFT's merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_helpers import all_logits, dir_digest, mm_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gemma4_bridge.cli import main
from gemma4_bridge.testing.fixtures import build_tiny_gemma4, load_tiny_model, variant

TOWER_SITE = "model.vision_tower.encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def inputs(tiny_dir: Path) -> dict:
    return mm_inputs(tiny_dir)


def _peft_merged_logits(model_dir: Path, adapter: Path, inputs: dict) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_tiny_model(model_dir), adapter).merge_and_unload()
    return all_logits(merged, inputs)


def _reshard(model_dir: Path, out: Path, parts: int) -> Path:
    """The tiny model split into ``parts`` shards with an index, as large checkpoints ship."""
    import shutil

    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        shard = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[i::parts]
        save_file({n: tensors[n] for n in chunk}, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def test_merge_matches_peft_merge_and_unload(capsys, tiny_dir, all_linear_adapter, inputs, tmp_path) -> None:
    before = dir_digest(tiny_dir), dir_digest(all_linear_adapter)
    out = tmp_path / "merged"
    assert main(["merge", str(all_linear_adapter), "--base", str(tiny_dir), "-o", str(out)]) == 0
    assert (dir_digest(tiny_dir), dir_digest(all_linear_adapter)) == before
    merged = all_logits(load_tiny_model(out), inputs)
    reference = _peft_merged_logits(tiny_dir, all_linear_adapter, inputs)
    base = all_logits(load_tiny_model(tiny_dir), inputs)
    for kind in ("text", "image", "audio"):
        moved = float((reference[kind] - base[kind]).abs().max())
        err = float((merged[kind] - reference[kind]).abs().max())
        assert moved > 1e-2, (kind, moved)
        assert err < 1e-5, f"{kind}: merged logits differ from PEFT merge_and_unload by {err}"
    # Side files copied; tensor names unchanged; tower delta went inside the clamp.
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    new, old = load_file(out / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    assert new.keys() == old.keys()
    assert not torch.equal(new[f"{TOWER_SITE}.linear.weight"], old[f"{TOWER_SITE}.linear.weight"])
    for buf in ("input_min", "input_max", "output_min", "output_max"):
        assert torch.equal(new[f"{TOWER_SITE}.{buf}"], old[f"{TOWER_SITE}.{buf}"])


def test_merge_sharded_checkpoint_rewrites_index(tiny_dir, all_linear_adapter, inputs, tmp_path) -> None:
    sharded = _reshard(tiny_dir, tmp_path / "sharded", parts=3)
    out = tmp_path / "merged"
    assert main(["merge", str(all_linear_adapter), "--base", str(sharded), "-o", str(out)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for shard in out.glob("*.safetensors") for t in load_file(shard).values()
    )
    merged = all_logits(load_tiny_model(out), inputs)
    reference = _peft_merged_logits(tiny_dir, all_linear_adapter, inputs)
    assert max(float((merged[k] - reference[k]).abs().max()) for k in merged) < 1e-5


def test_bf16_base_stays_bf16(tiny_dir, all_linear_adapter, tmp_path) -> None:
    bf16_dir = build_tiny_gemma4(tmp_path / "bf16", variant(dtype="bfloat16"))
    out = tmp_path / "merged"
    assert main(["merge", str(all_linear_adapter), "--base", str(bf16_dir), "-o", str(out)]) == 0
    old, new = load_file(bf16_dir / "model.safetensors"), load_file(out / "model.safetensors")
    adapter = load_file(all_linear_adapter / "adapter_model.safetensors")
    config = json.loads((all_linear_adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    changed = 0
    for name, tensor in new.items():
        assert tensor.dtype == old[name].dtype, name
        a_key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if a_key in adapter:
            b = adapter[a_key.replace("lora_A", "lora_B")]
            expected = (old[name].float() + scaling * (b @ adapter[a_key])).to(torch.bfloat16)
            assert torch.equal(tensor, expected), name
            changed += 1
        else:
            assert torch.equal(tensor, old[name]), name
    assert changed == len(adapter) // 2


def test_merge_zero3_damaged_adapter(zero3_run, tiny_dir, inputs, tmp_path) -> None:
    """merge accepts what convert accepts: the damaged adapter merges to the gathered truth."""
    out = tmp_path / "merged"
    assert main(["merge", str(zero3_run.damaged_adapter), "--base", str(tiny_dir), "-o", str(out)]) == 0
    merged = all_logits(load_tiny_model(out), {"text": inputs["text"]})
    reference = _peft_merged_logits(tiny_dir, zero3_run.reference_adapter, {"text": inputs["text"]})
    assert float((merged["text"] - reference["text"]).abs().max()) < 1e-5


def test_merge_records_provenance(tiny_dir, all_linear_adapter, tmp_path) -> None:
    out = tmp_path / "merged"
    assert main(["merge", str(all_linear_adapter), "--base", str(tiny_dir), "-o", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        record = json.loads(f.metadata()["gemma4_bridge_merge"])
    assert record["adapter"] == str(all_linear_adapter)
    assert f"{TOWER_SITE}.linear.weight" in record["merged_tensors"]
