"""ZeRO-3 recovery of MoE expert LoRA from a real 2-rank DeepSpeed run (gloo, CPU).

PEFT's 3-D expert factors are partitioned like any other parameter; an ungathered save writes
them with zero elements. convert must recover every one from the DeepSpeed checkpoint, equal to
the adapter gathered by DeepSpeed itself. One run (~1.5-3 min on a busy 2-core box).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemma4_bridge.converters.convert import convert_adapter
from gemma4_bridge.converters.inspect import inspect_adapter
from gemma4_bridge.testing.family import EXPERT_PARAMETERS, build_family_member, family_spec


@pytest.fixture(scope="module")
def moe_zero3(tmp_path_factory: pytest.TempPathFactory):
    from gemma4_bridge.testing.zero3_job import run_zero3_job

    model_dir = build_family_member(tmp_path_factory.mktemp("moe_z3") / "model", family_spec("moe", vision=False))
    job = run_zero3_job(model_dir, tmp_path_factory.mktemp("moe_z3") / "run", steps=1, world_size=2, target_parameters=EXPERT_PARAMETERS)
    return model_dir, job


def test_expert_lora_recovered_from_zero3_checkpoint(moe_zero3, tmp_path: Path) -> None:
    model_dir, job = moe_zero3
    damaged = json.loads((job.out_dir / "job.json").read_text())["damaged_tensors"]
    expert_damaged = [k for k in damaged if ".experts." in k]
    assert len(expert_damaged) == 4 * 5  # A and B of both parameters in 5 layers: all partitioned
    report = inspect_adapter(job.damaged_adapter, base=model_dir)
    assert report.status == "fixable" and [q.code for q in report.problems] == ["zero-element"]
    p = convert_adapter(job.damaged_adapter, tmp_path / "recovered", base=model_dir)
    assert sum(t.from_zero3 for t in p.tensors) == len(damaged)
    got = load_file(tmp_path / "recovered" / "adapter_model.safetensors")
    want = load_file(job.reference_adapter / "adapter_model.safetensors")
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_expert_tensor_from_another_step_is_refused(moe_zero3, capsys, tmp_path: Path) -> None:
    """Intact expert tensors are checked against the checkpoint like dense ones: an adapter whose
    expert factor is not the checkpoint's (another step) is refused; the checkpoint's own value passes."""
    from safetensors.torch import save_file

    from gemma4_bridge.cli import main

    model_dir, job = moe_zero3
    damaged = load_file(job.damaged_adapter / "adapter_model.safetensors")
    want = load_file(job.reference_adapter / "adapter_model.safetensors")
    expert = next(k for k in sorted(damaged) if ".experts." in k and damaged[k].numel() == 0)
    for name, value, ok in (("same", want[expert], True), ("other", want[expert] + 0.5, False)):
        adapter = tmp_path / name
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text((job.damaged_adapter / "adapter_config.json").read_text())
        save_file({**damaged, expert: value.contiguous()}, adapter / "adapter_model.safetensors")
        argv = ["convert", str(adapter), "-o", str(tmp_path / f"out_{name}"), "--base", str(model_dir), "--zero3-checkpoint", str(job.checkpoint_dir)]
        rc = main(argv)
        err = capsys.readouterr().err
        if ok:
            assert rc == 0, err
            got = load_file(tmp_path / f"out_{name}" / "adapter_model.safetensors")
            assert all(torch.equal(got[k], want[k]) for k in want)
        else:
            assert rc == 2 and "another training step" in err and expert in err and "Fix:" in err, err
            assert not (tmp_path / f"out_{name}").exists()
