"""ZeRO-3 recovery, from a real 2-rank DeepSpeed run on CPU (gloo) and synthetic N-rank checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import dir_digest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gemma4_bridge.cli import main
from gemma4_bridge.converters.zero3 import Zero3Checkpoint, locate_checkpoint
from gemma4_bridge.testing.zero3_job import write_synthetic_zero3_checkpoint

pytestmark = pytest.mark.deepspeed


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _adapter_only(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(src / name, dst / name)
    return dst


def test_real_run_saved_a_damaged_adapter(zero3_run) -> None:
    record = json.loads((zero3_run.out_dir / "job.json").read_text())
    assert record["world_size"] == 2
    assert record["damaged_tensors"] and record["intact_tensors"]  # "half the layers" survive
    with safe_open(str(zero3_run.damaged_adapter / "adapter_model.safetensors"), framework="pt") as f:
        assert any(0 in f.get_slice(k).get_shape() for k in f.keys())  # noqa: SIM118


def test_convert_recovers_exact_values(capsys, monkeypatch, zero3_run, tiny_dir, tmp_path) -> None:
    """Checkpoint found next to the adapter (HF Trainer layout); recovered == gathered truth, bitwise."""
    before = dir_digest(zero3_run.damaged_adapter)
    copied = []  # the fp32 adapter's recovered tensors are copied from the rank files in the kernel
    file_ranges = Zero3Checkpoint.file_ranges
    monkeypatch.setattr(Zero3Checkpoint, "file_ranges", lambda self, name: copied.append(name) or file_ranges(self, name))
    rc, out, err = _cli(capsys, "convert", str(zero3_run.damaged_adapter), "-o", str(tmp_path / "fixed"), "--base", str(tiny_dir))
    assert rc == 0, err
    damaged = json.loads((zero3_run.out_dir / "job.json").read_text())["damaged_tensors"]
    assert f"recovered from ZeRO-3 {len(damaged)}" in out and len(copied) == len(damaged)
    got = load_file(tmp_path / "fixed" / "adapter_model.safetensors")
    truth = load_file(zero3_run.reference_adapter / "adapter_model.safetensors")
    assert got.keys() == truth.keys()
    assert all(torch.equal(got[k], truth[k]) for k in truth)
    assert all(got[k].numel() > 0 for k in damaged)
    assert dir_digest(zero3_run.damaged_adapter) == before


def test_recovered_adapter_gives_trained_logits(zero3_run, tiny_dir, tmp_path) -> None:
    from convert_helpers import all_logits, mm_inputs
    from peft import PeftModel

    from gemma4_bridge.converters import convert_adapter
    from gemma4_bridge.testing.fixtures import load_tiny_model

    convert_adapter(zero3_run.damaged_adapter, tmp_path / "fixed", base=tiny_dir)
    inputs = {"text": mm_inputs(tiny_dir)["text"]}
    truth = all_logits(PeftModel.from_pretrained(load_tiny_model(tiny_dir), zero3_run.reference_adapter), inputs)["text"]
    got = all_logits(PeftModel.from_pretrained(load_tiny_model(tiny_dir), tmp_path / "fixed"), inputs)["text"]
    base = all_logits(load_tiny_model(tiny_dir), inputs)["text"]
    assert float((truth - base).abs().max()) > 1e-2
    assert float((got - truth).abs().max()) < 1e-6


def test_deepspeed_zero_to_fp32_agrees(zero3_run) -> None:
    """Our reader and DeepSpeed's own consolidation give the same fp32 values on the real checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Zero3Checkpoint.open(locate_checkpoint(zero3_run.damaged_adapter, None))
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(zero3_run.checkpoint_dir))
    assert ckpt.world_size == 2 and ckpt.param_shapes
    for _ in range(2):  # twice: pages released after the first read must read back the same
        for name in ckpt.param_shapes:
            assert torch.equal(ckpt.recover(name), theirs[name]), name


def test_checkpoint_elsewhere_needs_flag(capsys, zero3_run, tiny_dir, tmp_path) -> None:
    moved = _adapter_only(zero3_run.damaged_adapter, tmp_path / "runs" / "adapter")
    rc, _, err = _cli(capsys, "convert", str(moved), "-o", str(tmp_path / "out"), "--base", str(tiny_dir))
    assert rc == 2 and "zero elements" in err and "--zero3-checkpoint" in err
    assert str(moved) in err and str(moved.parent) in err  # says where it looked
    assert not (tmp_path / "out").exists()
    rc, _, err = _cli(
        capsys, "convert", str(moved), "-o", str(tmp_path / "out"), "--base", str(tiny_dir),
        "--zero3-checkpoint", str(zero3_run.checkpoint_dir),
    )  # fmt: skip
    assert rc == 0, err
    truth = load_file(zero3_run.reference_adapter / "adapter_model.safetensors")
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], truth[k]) for k in truth)


def test_checkpoint_from_another_step_is_refused(capsys, zero3_run, tiny_dir, tmp_path) -> None:
    """The adapter's intact tensors must match the checkpoint, else values would mix two steps."""
    moved = _adapter_only(zero3_run.damaged_adapter, tmp_path / "other")
    tensors = load_file(moved / "adapter_model.safetensors")
    intact = next(k for k, v in tensors.items() if v.numel())
    tensors[intact] = tensors[intact] + 0.5
    save_file(tensors, moved / "adapter_model.safetensors")
    rc, _, err = _cli(
        capsys, "convert", str(moved), "-o", str(tmp_path / "out"), "--base", str(tiny_dir),
        "--zero3-checkpoint", str(zero3_run.checkpoint_dir),
    )  # fmt: skip
    assert rc == 2 and "another training step" in err and intact in err and "Fix:" in err
    assert not (tmp_path / "out").exists()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_pickle_is_refused(capsys, zero3_run, tiny_dir, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero3_run.checkpoint_dir, ckpt)
    marker = tmp_path / "PWNED"
    optim = next(ckpt.glob("global_step*/zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    torch.save({"optimizer_state_dict": {"fp32_flat_groups": [_Payload(str(marker))]}}, optim)
    moved = _adapter_only(zero3_run.damaged_adapter, tmp_path / "adapter")
    rc, _, err = _cli(capsys, "convert", str(moved), "-o", str(tmp_path / "out"), "--base", str(tiny_dir), "--zero3-checkpoint", str(ckpt))
    assert rc == 2 and "refused to load this pickle" in err and optim.name in err
    assert not marker.exists(), "the checkpoint's pickle payload ran"
    assert not (tmp_path / "out").exists()


def test_allow_list_uses_inert_stand_ins(zero3_run) -> None:
    """DeepSpeed's enum/loss-scaler classes are named in the pickle; we build stand-ins, never DeepSpeed's own."""
    from gemma4_bridge.adapter_io import safe_torch_load
    from gemma4_bridge.converters.zero3 import deepspeed_globals

    optim = next(Path(locate_checkpoint(zero3_run.damaged_adapter, None)).glob("*optim_states.pt"))
    state = safe_torch_load(optim, extra_globals=deepspeed_globals(), mmap=True)["optimizer_state_dict"]
    assert type(state["zero_stage"]) in deepspeed_globals() and int(state["zero_stage"]) == 3
    assert type(state["loss_scaler"]) in deepspeed_globals()
    with pytest.raises(Exception, match="refused"):
        safe_torch_load(optim)  # without the DeepSpeed allow-list the same file is refused


def test_missing_rank_file(capsys, zero3_run, tiny_dir, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero3_run.checkpoint_dir, ckpt)
    next(ckpt.glob("global_step*/zero_pp_rank_1_mp_rank_00_optim_states.pt")).unlink()
    moved = _adapter_only(zero3_run.damaged_adapter, tmp_path / "adapter")
    rc, _, err = _cli(capsys, "convert", str(moved), "-o", str(tmp_path / "out"), "--base", str(tiny_dir), "--zero3-checkpoint", str(ckpt))
    assert rc == 2 and "partition_count=2" in err and "1 rank file" in err


def _synthetic_run(all_linear_adapter: Path, tmp_path: Path, world_size: int, num_groups: int, dtype: torch.dtype) -> tuple[Path, dict]:
    """A synthetic checkpoint (DeepSpeed's format, checked against zero_to_fp32) of fp32 masters that are
    not bf16-exact, beside an adapter of ``dtype`` with every third tensor intact, the others zero-element."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    truth = load_file(all_linear_adapter / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(world_size)
    masters = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in truth.items()}
    names = {k: k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.") for k in truth}
    run = tmp_path / "checkpoint-1"
    run.mkdir()
    write_synthetic_zero3_checkpoint({names[k]: v for k, v in masters.items()}, run, world_size=world_size, num_groups=num_groups)
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(run))
    assert all(torch.equal(theirs[names[k]], v) for k, v in masters.items())
    damaged = {k: (v.new_zeros(0) if i % 3 else v).to(dtype) for i, (k, v) in enumerate(masters.items())}
    save_file(damaged, run / "adapter_model.safetensors")
    shutil.copy2(all_linear_adapter / "adapter_config.json", run / "adapter_config.json")
    return run, masters


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("world_size", "num_groups"), [(1, 1), (3, 2), (4, 3)])
def test_any_number_of_ranks_and_dtype(capsys, monkeypatch, all_linear_adapter, tiny_dir, tmp_path, world_size, num_groups, dtype) -> None:
    """fp32 masters cast to a bf16 adapter (read and cast), or copied as they are into an fp32 one (each
    rank's chunk copied from the rank file in the kernel, padding at partition ends left out)."""
    run, masters = _synthetic_run(all_linear_adapter, tmp_path, world_size, num_groups, dtype)
    copied = []
    file_ranges = Zero3Checkpoint.file_ranges
    monkeypatch.setattr(Zero3Checkpoint, "file_ranges", lambda self, name: copied.append(name) or file_ranges(self, name))
    rc, _, err = _cli(capsys, "convert", str(run), "-o", str(tmp_path / "out"), "--base", str(tiny_dir))
    assert rc == 0, err
    assert len(copied) == (sum(1 for i in range(len(masters)) if i % 3) if dtype == torch.float32 else 0)
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for k, v in masters.items():
        assert got[k].dtype == dtype
        assert torch.equal(got[k], v.to(dtype)), k


def test_nan_in_recovered_value_refused_not_in_padding(capsys, all_linear_adapter, tiny_dir, tmp_path) -> None:
    """Values copied in the kernel are checked on maps of the rank files: a NaN in a recovered tensor
    is refused by name and nothing is written; a NaN in the padding after a parameter's last element
    (not a value) passes, with the values exact."""
    run, masters = _synthetic_run(all_linear_adapter, tmp_path, 3, 1, torch.float32)
    ckpt = Zero3Checkpoint.open(locate_checkpoint(run, None))
    damaged = [k for i, k in enumerate(masters) if i % 3]
    key = next(k for k in damaged if masters[k].numel() % 3)
    name = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
    chunk = -(-masters[key].numel() // 3)
    (path, (group,)), real = ckpt.partitions[2], masters[key].numel() - 2 * chunk
    ckpt.close()

    def poke(element: int) -> None:
        with open(path, "r+b") as f:
            f.seek(group.offset + (ckpt.offsets[name] + element) * 4)
            f.write(torch.tensor([float("nan")]).numpy().tobytes())

    poke(real)  # the first padding element of the last rank's chunk
    rc, _, err = _cli(capsys, "convert", str(run), "-o", str(tmp_path / "out"), "--base", str(tiny_dir))
    assert rc == 0, err
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in masters.items())
    poke(real - 1)  # the parameter's last value
    rc, _, err = _cli(capsys, "convert", str(run), "-o", str(tmp_path / "out2"), "--base", str(tiny_dir))
    assert rc == 2 and key in err and "1 NaN/Inf" in err and "(recovered)" in err and "Fix:" in err, err
    assert not (tmp_path / "out2").exists()


def test_inspect_reports_recoverable(capsys, zero3_run, tiny_dir) -> None:
    rc, out, _ = _cli(capsys, "inspect", str(zero3_run.damaged_adapter), "--base", str(tiny_dir), "--json")
    report = json.loads(out)
    assert rc == 1 and report["status"] == "fixable" and "zero3-damaged" in report["flavours"]
    zero = next(p for p in report["problems"] if p["code"] == "zero-element")
    assert "global_step" in zero["fix"]
    vllm = next(v for v in report["verdicts"] if v["server"].startswith("vLLM 0.32"))
    assert vllm["status"] == "fails" and any("EngineDeadError" in n for n in vllm["notes"])


def test_rank_file_replaced_after_open_is_refused(all_linear_adapter, tmp_path) -> None:
    """Offsets read from one file must not be used to copy from another: a rank file rewritten
    between reading the checkpoint's structure and reading its values is an error naming it."""
    from gemma4_bridge.errors import BridgeError

    run, _ = _synthetic_run(all_linear_adapter, tmp_path, 2, 1, torch.float32)
    ckpt = Zero3Checkpoint.open(locate_checkpoint(run, None))
    name = next(iter(ckpt.param_shapes))
    path = ckpt.partitions[1][0]
    replacement = path.with_suffix(".new")
    shutil.copy2(path, replacement)
    os.replace(replacement, path)  # same bytes, another file
    with pytest.raises(BridgeError, match="changed while it was being read") as err:
        ckpt.file_ranges(name)
    assert str(path) in str(err.value)
    ckpt.close()
