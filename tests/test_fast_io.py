"""The fast I/O paths behind convert and the vLLM plugin's loads: same bytes, same refusals, input untouched."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4_bridge.converters import safetensors_stream as ss
from gemma4_bridge.converters.safetensors_stream import FileRange, SafetensorsReader, write_streaming
from gemma4_bridge.layout import read_safetensors_header


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(3 + i, 5, generator=gen) for i in range(6)} | {"half": torch.randn(7, dtype=torch.float16, generator=gen)}
    path = tmp_path / "src.safetensors"
    save_file(tensors, path)
    return path, tensors


def _copy_all(reader: SafetensorsReader, out: Path, order: list[str]) -> None:
    specs = {s.name: s for s in reader.specs()}
    write_streaming(out, [specs[n] for n in order], lambda spec: reader.file_range(spec.name))
    reader.close()


@pytest.mark.parametrize("refuse", [(), ("copy_file_range",), ("copy_file_range", "sendfile")])
def test_file_ranges_copy_exact_bytes_whatever_the_kernel_offers(source, tmp_path, monkeypatch, refuse) -> None:
    """Ranges are coalesced where adjacent and copied by copy_file_range, else sendfile, else read + write."""
    path, tensors = source
    for name in refuse:

        def refused(*_: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(ss, f"_{name}", refused)
    calls: list[int] = []
    original = ss.copy_range
    monkeypatch.setattr(ss, "copy_range", lambda f, r: (calls.append(r.nbytes), original(f, r)))
    reader = SafetensorsReader(path, read_safetensors_header(path))
    in_file_order = [s.name for s in reader.specs()]
    order = in_file_order[3:] + in_file_order[:3]  # two adjacent runs
    _copy_all(reader, tmp_path / "out.safetensors", order)
    got = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert len(calls) == 2 and sum(calls) == sum(v.numel() * v.element_size() for v in tensors.values())


def _data_offsets(path: Path) -> dict[str, int]:
    """Tensor name -> absolute file offset of its data."""
    header = read_safetensors_header(path)
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    return {k: start + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_file_ranges_are_copied_from_folio_boundaries_at_their_source_offsets(tmp_path, monkeypatch) -> None:
    """With ``data_start`` the output's tensors lie at their source offsets modulo COPY_ALIGN (the
    header padded with spaces) and every kernel copy but a range's head starts on a COPY_ALIGN
    boundary: where the kernel copies whole folios (763 MB: 0.21 s CPU vs 0.33 s)."""
    gen = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(3, dtype=torch.float16, generator=gen)} | {f"t{i}": torch.randn(50_000 + i, generator=gen) for i in range(4)}
    path = tmp_path / "src.safetensors"
    save_file(tensors, path)
    calls: list[tuple[int, int, int]] = []  # (source offset, output offset, bytes)
    original = ss._copy_file_range

    def recorded(src: int, out: int, offset: int, count: int) -> int:
        calls.append((offset, os.lseek(out, 0, os.SEEK_CUR), count))
        return original(src, out, offset, count)

    monkeypatch.setattr(ss, "_copy_file_range", recorded)
    reader = SafetensorsReader(path, read_safetensors_header(path))
    assert reader.data_start % ss.COPY_ALIGN, "the test needs a source whose data does not start on a boundary"
    specs = {s.name: s for s in reader.specs()}
    order = [n for n in specs if n != "a"]  # one run, starting after the source's first tensor
    write_streaming(tmp_path / "out.safetensors", [specs[n] for n in order], lambda spec: reader.file_range(spec.name), data_start=reader.data_start)
    reader.close()
    got = load_file(tmp_path / "out.safetensors")
    assert set(got) == set(order) and all(torch.equal(got[k], tensors[k]) for k in order)
    src_at, out_at = _data_offsets(path), _data_offsets(tmp_path / "out.safetensors")
    assert all((out_at[k] - src_at[k]) % ss.COPY_ALIGN == 0 for k in order)
    assert sum(n for *_, n in calls) == sum(specs[k].nbytes for k in order) and len(calls) >= 2
    assert all((o - s) % ss.COPY_ALIGN == 0 for s, o, _ in calls)
    assert calls[0][0] % ss.COPY_ALIGN and all(s % ss.COPY_ALIGN == 0 for s, _, _ in calls[1:])
    # Without data_start, no padding: the header is the JSON padded to 8 bytes, as before.
    write_streaming(tmp_path / "plain.safetensors", [specs["t0"]], lambda spec: tensors["t0"])
    assert int.from_bytes((tmp_path / "plain.safetensors").read_bytes()[:8], "little") < 200


def test_convert_copies_renamed_tensors_to_their_source_offsets(tiny_dir: Path, all_linear_adapter: Path, tmp_path: Path) -> None:
    """convert pads the output header so each renamed tensor keeps its source offset modulo COPY_ALIGN."""
    from convert_helpers import default_adapter_name, write_variant

    from gemma4_bridge.converters import convert_adapter

    src = write_variant(all_linear_adapter, tmp_path / "src", rename=default_adapter_name)
    plan = convert_adapter(src, tmp_path / "out", base=tiny_dir)
    src_at, out_at = _data_offsets(src / "adapter_model.safetensors"), _data_offsets(tmp_path / "out" / "adapter_model.safetensors")
    assert plan.renamed == len(plan.tensors) == len(out_at) > 0
    assert all((out_at[e.key] - src_at[e.source_key]) % ss.COPY_ALIGN == 0 for e in plan.tensors)


def test_file_range_past_the_end_fails_clearly(source, tmp_path) -> None:
    path, _ = source
    reader = SafetensorsReader(path, read_safetensors_header(path))
    spec = reader.specs()[-1]
    size = path.stat().st_size
    with pytest.raises(ValueError, match="truncated"):
        write_streaming(tmp_path / "out.safetensors", [spec], lambda _: FileRange(reader.file_range(spec.name).fd, size - 4, spec.nbytes))
    reader.close()


def test_read_many_views_are_private(source) -> None:
    """vLLM scales lora_B in place: writes to the mapped tensors must never reach the adapter file."""
    path, tensors = source
    before = path.read_bytes()
    reader = SafetensorsReader(path, read_safetensors_header(path))
    got = reader.read_many(list(tensors))
    assert set(got) == set(tensors) and all(torch.equal(got[k], v) for k, v in tensors.items())
    for t in got.values():
        t.mul_(3)
    assert path.read_bytes() == before
    assert torch.equal(reader.read_many(["t0"])["t0"], tensors["t0"])


def test_read_many_refuses_a_file_truncated_after_its_header_was_checked(source) -> None:
    """Mapping past the end would kill the process (SIGBUS) on first touch: a clear error instead."""
    path, tensors = source
    reader = SafetensorsReader(path, read_safetensors_header(path))
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 8)
    with pytest.raises(ValueError, match="truncated"):
        reader.read_many(list(tensors))
    reader.close()


def test_plugin_paths_refuse_nan_like_convert(tiny_dir: Path, tmp_path: Path) -> None:
    """The front end's in-place check and the worker's mapped load refuse the tensor convert refuses."""
    pytest.importorskip("vllm")
    from convert_helpers import write_variant

    from gemma4_bridge.testing.fixtures import write_peft_adapter

    from gemma4_bridge.errors import BridgeError
    from gemma4_bridge.layout import Gemma4Layout
    from gemma4_bridge.plugins.vllm.adapter import ServingContext, check_adapter, check_values, prepare_adapter

    target = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    adapter = write_peft_adapter(tiny_dir, tmp_path / "lm", target_modules=target, seed=3)
    key = sorted(k for k in load_file(adapter / "adapter_model.safetensors") if "lora_B" in k)[-1]

    def poison(k: str, v: torch.Tensor) -> torch.Tensor:
        if k == key:
            v = v.clone()
            v[-1, -1] = float("inf")
        return v

    bad = write_variant(adapter, tmp_path / "inf", transform=poison)
    ctx = ServingContext(Gemma4Layout.from_model_dir(tiny_dir), enable_tower_connector_lora=True, max_lora_rank=64)
    for run in (lambda: check_values(check_adapter(bad, ctx)), lambda: prepare_adapter(bad, ctx)):
        with pytest.raises(BridgeError, match="NaN/Inf") as err:
            run()
        assert key in str(err.value)
    good = prepare_adapter(adapter, ctx)
    src = load_file(adapter / "adapter_model.safetensors")
    assert good.plan.tensors and all(torch.equal(good.tensors[e.key], src[e.source_key]) for e in good.plan.tensors)
