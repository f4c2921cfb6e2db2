"""Bad input: one clear paragraph naming file, tensor and fix; non-zero exit; no traceback; the
input untouched; no output (not even a temp directory) left behind."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from convert_helpers import copy_adapter, default_adapter_name, dir_digest, write_variant
from safetensors.torch import load_file, save_file

from gemma4_bridge.cli import main

A_KEY = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(capsys, adapter: Path, tiny_dir: Path, *expect: str, command: str = "convert", rc: int = 2) -> str:
    """Run convert/merge on ``adapter`` and check the whole bad-input contract."""
    before = dir_digest(adapter) if adapter.is_dir() else {}
    out = adapter.parent / f"{adapter.name}-OUT"
    argv = [command, str(adapter), "-o", str(out), "--base", str(tiny_dir)]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == rc, (code, err)
    assert err.startswith(f"gemma4-bridge {command}: error: "), err
    assert "Traceback" not in err + stdout
    assert "Fix:" in err, err
    for text in expect:
        assert text in err, (text, err)
    assert len(err.strip().splitlines()) == 1, f"not one paragraph: {err!r}"
    assert not out.exists(), "partial output left behind"
    assert not [p for p in adapter.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")], "temp dir left behind"
    if before:
        assert dir_digest(adapter) == before, "input modified"
    return err


def test_truncated_safetensors(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    bad = copy_adapter(all_linear_adapter, tmp_path / "truncated")
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_refused(capsys, bad, tiny_dir, str(weights), "truncated")


def test_truncated_while_converting(capsys, tmp_path, all_linear_adapter, tiny_dir, monkeypatch) -> None:
    """Truncated after its header was checked (another process rewriting it): an error, not a SIGBUS
    from touching mapped pages past the end of the file."""
    import gemma4_bridge.converters.convert as convert_mod

    bad = copy_adapter(all_linear_adapter, tmp_path / "shrinking")
    weights = bad / "adapter_model.safetensors"
    planned = convert_mod.plan

    def plan_then_truncate(*args, **kwargs):
        result = planned(*args, **kwargs)
        os.truncate(weights, weights.stat().st_size - 1000)  # the other process, between check and read
        return result

    monkeypatch.setattr(convert_mod, "plan", plan_then_truncate)
    code, _, err = run_cli(capsys, "convert", str(bad), "-o", str(tmp_path / "out"), "--base", str(tiny_dir))
    assert code == 2 and "truncated" in err and str(weights) in err and "Fix:" in err, err
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors_header(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    bad = copy_adapter(all_linear_adapter, tmp_path / "corrupt")
    weights = bad / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    weights.write_bytes(bytes(data))
    assert_refused(capsys, bad, tiny_dir, str(weights), "corrupt")


def test_missing_config(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    bad = copy_adapter(all_linear_adapter, tmp_path / "noconfig")
    (bad / "adapter_config.json").unlink()
    assert_refused(capsys, bad, tiny_dir, "adapter_config.json", str(bad))


def test_invalid_config_json(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    bad = copy_adapter(all_linear_adapter, tmp_path / "badjson")
    (bad / "adapter_config.json").write_text('{"r": 4, ')
    assert_refused(capsys, bad, tiny_dir, str(bad / "adapter_config.json"), "not valid JSON")


def test_empty_directory(capsys, tmp_path, tiny_dir) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(capsys, empty, tiny_dir, str(empty), "empty directory")


def test_rank_mismatch(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    bad = write_variant(all_linear_adapter, tmp_path / "rank", transform=lambda k, v: v[:, :3] if k == B_KEY else v)
    assert_refused(capsys, bad, tiny_dir, str(bad / "adapter_model.safetensors"), A_KEY, B_KEY, "rank", rc=2)


def test_adapter_for_another_model_size(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    """Tensors sized for a wider model (hidden 128 instead of 64)."""

    def widen(key: str, value: torch.Tensor) -> torch.Tensor:
        return torch.cat([value, value], dim=1) if key == A_KEY else value

    bad = write_variant(all_linear_adapter, tmp_path / "size", transform=widen)
    err = assert_refused(capsys, bad, tiny_dir, A_KEY, "another model size", "--base")
    assert "[4, 128]" in err


def test_layers_the_base_does_not_have(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    """An adapter for a deeper Gemma 4 (layer 9 on a 5-layer base)."""
    extra = {A_KEY.replace("layers.0", "layers.9"): torch.ones(4, 64), B_KEY.replace("layers.0", "layers.9"): torch.ones(64, 4)}
    bad = write_variant(all_linear_adapter, tmp_path / "deeper", extra=extra)
    assert_refused(capsys, bad, tiny_dir, "layers.9", "another model", "--base")


def test_nan(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    def poison(key: str, value: torch.Tensor) -> torch.Tensor:
        if key == B_KEY:
            value = value.clone()
            value[0, 0] = float("nan")
        return value

    bad = write_variant(all_linear_adapter, tmp_path / "nan", transform=poison)
    assert_refused(capsys, bad, tiny_dir, str(bad / "adapter_model.safetensors"), B_KEY, "NaN")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_adapter_is_never_executed(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    bad = copy_adapter(all_linear_adapter, tmp_path / "evil")
    (bad / "adapter_model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    with open(bad / "adapter_model.bin", "wb") as f:
        pickle.dump({A_KEY: _Payload(str(marker))}, f)
    assert_refused(capsys, bad, tiny_dir, str(bad / "adapter_model.bin"), "refused to load this pickle")
    assert not marker.exists(), "the pickle payload ran"


def test_pickle_adapter_is_converted(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    """The benign case of the same flavour: plain tensors in adapter_model.bin load (weights_only) and convert."""
    src = write_variant(all_linear_adapter, tmp_path / "bin", rename=default_adapter_name, as_pickle=True)
    code, out, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "bin-out"), "--base", str(tiny_dir))
    assert code == 0, err
    assert load_file(tmp_path / "bin-out" / "adapter_model.safetensors").keys() == load_file(all_linear_adapter / "adapter_model.safetensors").keys()


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
        ({"init_lora_weights": "olora"}, "residual base"),
        ({"alora_invocation_tokens": [7, 8]}, "invocation tokens"),
        ({"layer_replication": [[0, 2], [1, 3]]}, "layer_replication"),
        ({"use_qalora": True}, "QA-LoRA"),
    ],
)
def test_unservable_configs(capsys, tmp_path, all_linear_adapter, tiny_dir, change, expect) -> None:
    bad = write_variant(all_linear_adapter, tmp_path / "cfg", config_update=change)
    assert_refused(capsys, bad, tiny_dir, str(bad / "adapter_config.json"), expect)


def test_zero_element_tensors_without_checkpoint(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    bad = write_variant(all_linear_adapter, tmp_path / "z3", transform=lambda k, v: v[:0] if k == A_KEY else v)
    err = assert_refused(capsys, bad, tiny_dir, A_KEY, "zero elements", "looked for", str(bad), "--zero3-checkpoint")
    assert str(bad.parent) in err


def test_existing_output_needs_force(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "convert", str(all_linear_adapter), "-o", str(out), "--base", str(tiny_dir))
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "convert", str(all_linear_adapter), "-o", str(out), "--base", str(tiny_dir), "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_output_inside_input_is_refused(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    src = copy_adapter(all_linear_adapter, tmp_path / "src")
    before = dir_digest(src)
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(src), "--base", str(tiny_dir), "--force")
    assert code == 2 and "overlaps the input" in err
    assert dir_digest(src) == before


def test_missing_base_is_explained(capsys, tmp_path, all_linear_adapter) -> None:
    src = write_variant(all_linear_adapter, tmp_path / "nobase", config_update={"base_model_name_or_path": "google/gemma-4-E4B-it"})
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "o"))
    assert code == 2 and "--base" in err and "google/gemma-4-E4B-it" in err


def test_debug_shows_traceback(tmp_path, all_linear_adapter, tiny_dir) -> None:
    from gemma4_bridge.errors import BridgeError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BridgeError):
        main(["convert", str(empty), "-o", str(tmp_path / "o"), "--base", str(tiny_dir), "--debug"])


def test_merge_refuses_bad_adapter_without_output(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    bad = write_variant(all_linear_adapter, tmp_path / "mnan", transform=lambda k, v: v * float("inf") if k == B_KEY else v)
    code, _, err = run_cli(capsys, "merge", str(bad), "--base", str(tiny_dir), "-o", str(tmp_path / "merged"))
    assert code == 2 and B_KEY in err and "NaN/Inf" in err and "Fix:" in err
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp")]


def test_config_json_is_not_lora(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    bad = copy_adapter(all_linear_adapter, tmp_path / "notlora")
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 4}))
    assert_refused(capsys, bad, tiny_dir, "IA3")


def test_safetensors_with_unexpected_dtype(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    tensors = load_file(all_linear_adapter / "adapter_model.safetensors")
    tensors[A_KEY] = tensors[A_KEY].to(torch.int8)
    bad = copy_adapter(all_linear_adapter, tmp_path / "int8")
    save_file(tensors, bad / "adapter_model.safetensors")
    assert_refused(capsys, bad, tiny_dir, A_KEY)


# -- corrupt safetensors headers (issue 14 item 2): refused as strictly as the safetensors library --
def _rewrite_header(weights: Path, mutate) -> None:
    """Rewrite the JSON header of ``weights`` through ``mutate(header) -> header``, data bytes unchanged."""
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = mutate(json.loads(raw[8 : 8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _second(header: dict) -> str:
    """A tensor that is neither first nor last in the file (so each corruption breaks one rule)."""
    return _by_offset(header)[1]


def _set(name_of, field: str, value_of):
    def mutate(header: dict) -> dict:
        name = name_of(header)
        header[name][field] = value_of(header[name])
        return header

    return mutate


def _grow_last(header: dict) -> dict:
    """The last tensor claims twice its rows, shape and offsets consistent: its data runs past the file."""
    info = header[_by_offset(header)[-1]]
    begin, end = info["data_offsets"]
    info["shape"][0] *= 2
    info["data_offsets"] = [begin, end + (end - begin)]
    return header


CORRUPT_HEADERS = {
    # case: (mutation, which tensor the message names (None: the header as a whole), words in the message)
    "overlapping": (_set(_second, "data_offsets", lambda i: [i["data_offsets"][0] - 4, i["data_offsets"][1] - 4]), _second, "overlap"),
    "negative": (_set(_second, "data_offsets", lambda i: [-8, i["data_offsets"][1]]), _second, "non-negative"),
    "reversed": (_set(_second, "data_offsets", lambda i: i["data_offsets"][::-1]), _second, "reversed"),
    "out-of-bounds": (_grow_last, lambda h: _by_offset(h)[-1], "truncated"),
    "size-disagrees": (_set(_second, "shape", lambda i: [i["shape"][0], i["shape"][1] + 1]), _second, "needs"),
    "shape-not-list": (_set(_second, "shape", lambda i: 5), _second, "not a list"),
    "negative-dims": (_set(_second, "shape", lambda i: [-d for d in i["shape"]]), _second, "non-negative"),
    "header-is-list": (lambda h: [v for k, v in h.items() if k != "__metadata__"], None, "JSON list"),
    "entry-not-object": (lambda h: {**h, _second(h): h[_second(h)]["dtype"]}, _second, "not an object"),
}


def _corrupt_adapter(src: Path, dst: Path, case: str) -> tuple[Path, str | None, str]:
    mutate, name_of, words = CORRUPT_HEADERS[case]
    bad = copy_adapter(src, dst)
    weights = bad / "adapter_model.safetensors"
    raw = weights.read_bytes()
    original = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    tensor = name_of(original) if name_of else None
    _rewrite_header(weights, mutate)
    return bad, tensor, words


@pytest.mark.parametrize("case", list(CORRUPT_HEADERS))
def test_corrupt_header_refused_by_convert_and_inspect(capsys, tmp_path, all_linear_adapter, tiny_dir, case) -> None:
    """Before: overlapping/negative/reversed/out-of-range/mis-sized offsets converted with exit 0
    (header bytes and uninitialised memory written as weights) and inspect called them loadable;
    a list header, a non-object entry and ``"shape": 5`` raised tracebacks."""
    from safetensors import safe_open

    bad, tensor, words = _corrupt_adapter(all_linear_adapter, tmp_path / case, case)
    weights = bad / "adapter_model.safetensors"
    with pytest.raises(Exception), safe_open(str(weights), framework="pt"):  # the reference refuses it too
        pass
    expect = [str(weights), "corrupt safetensors header", words] + ([f"tensor {tensor}:"] if tensor else [])
    assert_refused(capsys, bad, tiny_dir, *expect)
    before = dir_digest(bad)
    code, stdout, err = run_cli(capsys, "inspect", str(bad), "--base", str(tiny_dir))
    assert code == 2, (code, stdout, err)
    assert err.startswith("gemma4-bridge inspect: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + stdout and "Fix:" in err
    assert all(text in err for text in expect), (expect, err)
    assert dir_digest(bad) == before
