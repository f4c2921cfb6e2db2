"""inspect: flavour, every problem, per-server verdicts, and an exit code for healthy / fixable / broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_helpers import default_adapter_name, dir_digest, drop_tower_linear, no_prefix, write_variant

from gemma4_bridge.cli import main

B_KEY = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"


def inspect_json(capsys, adapter: Path, *extra: str) -> tuple[int, dict]:
    rc = main(["inspect", str(adapter), "--json", *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, json.loads(out)


def verdict(report: dict, prefix: str) -> dict:
    return next(v for v in report["verdicts"] if v["server"].startswith(prefix))


def test_healthy_all_linear(capsys, all_linear_adapter) -> None:
    """A stock PEFT all-linear save is canonical; vLLM's k_eq_v bug and the tower flag are still called out."""
    rc, report = inspect_json(capsys, all_linear_adapter)  # base found via base_model_name_or_path
    assert rc == 0 and report["status"] == "healthy" and report["flavours"] == ["peft-all-linear"]
    assert report["summary"]["modules_per_component"]["vision_tower"] == 8  # 7 clippable + patch_embedder.input_proj
    vllm = verdict(report, "vLLM 0.32")
    assert vllm["status"] == "loads, silently wrong"
    assert any("attention_k_eq_v layer(s) [1]" in n for n in vllm["notes"])
    assert any("--enable-tower-connector-lora" in n for n in vllm["notes"])
    assert any("relative_k_proj" in n and "fail on every audio prompt" in n for n in vllm["notes"])
    plugin = verdict(report, "vLLM + gemma4-bridge")
    assert plugin["status"] == "loads" and any("relative_k_proj LoRA is applied per audio item" in n for n in plugin["notes"])
    sglang = verdict(report, "SGLang")
    assert sglang["status"] == "fails" and any("25913" in n for n in sglang["notes"])


@pytest.mark.parametrize(
    ("name", "kwargs", "flavour", "vllm_status"),
    [
        ("default", {"rename": default_adapter_name}, "adapter-name-in-keys", "fails"),
        ("noprefix", {"rename": no_prefix}, "no-peft-prefix", "loads, silently wrong"),
        ("custom", {"rename": drop_tower_linear}, "custom-clippable", "fails"),
        ("regex", {"config_update": {"target_modules": ".*proj"}}, "regex-target-modules", "loads, silently wrong"),
    ],
)
def test_fixable_flavours(capsys, tmp_path, all_linear_adapter, tiny_dir, name, kwargs, flavour, vllm_status) -> None:
    src = write_variant(all_linear_adapter, tmp_path / name, **kwargs)
    before = dir_digest(src)
    rc, report = inspect_json(capsys, src, "--base", str(tiny_dir))
    assert rc == 1 and report["status"] == "fixable", report["problems"]
    assert flavour in report["flavours"]
    assert verdict(report, "vLLM 0.32")["status"] == vllm_status
    assert all(p["severity"] != "broken" for p in report["problems"])
    assert dir_digest(src) == before


def test_kv_shared_tensors_counted(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    extra = {}
    for layer in (3, 4):
        for proj in ("k_proj", "v_proj"):
            key = f"base_model.model.model.language_model.layers.{layer}.self_attn.{proj}"
            extra[f"{key}.lora_A.weight"] = torch.ones(4, 64)
            extra[f"{key}.lora_B.weight"] = torch.ones(32 if layer == 3 else 64, 4)
    src = write_variant(all_linear_adapter, tmp_path / "kv", extra=extra)
    rc, report = inspect_json(capsys, src, "--base", str(tiny_dir))
    problem = next(p for p in report["problems"] if p["code"] == "kv-shared-module")
    assert rc == 1 and len(problem["tensors"]) == 8 and "5.5.0" in problem["message"]


@pytest.mark.parametrize(
    ("name", "kwargs", "code"),
    [
        ("nan", {"transform": lambda k, v: v * float("nan") if k == B_KEY else v}, "non-finite"),
        ("mts", {"config_update": {"modules_to_save": ["lm_head"]}}, "modules-to-save"),
        ("dora", {"config_update": {"use_dora": True}}, "dora"),
        ("bias", {"config_update": {"bias": "lora_only"}}, "bias"),
        ("pissa", {"config_update": {"init_lora_weights": "pissa"}}, "base-modifying-init"),
        ("loftq", {"config_update": {"init_lora_weights": "loftq"}}, "base-modifying-init"),
        ("alora", {"config_update": {"alora_invocation_tokens": [3]}}, "alora"),
        ("arrow", {"config_update": {"arrow_config": {"top_k": 2}}}, "arrow"),
        ("shape", {"transform": lambda k, v: torch.cat([v, v]) if k == B_KEY else v}, "shape-mismatch"),
        ("rank", {"transform": lambda k, v: v[:, :2] if k == B_KEY else v}, "rank-mismatch"),
        ("zero", {"transform": lambda k, v: v[:0] if k == B_KEY else v}, "zero-element"),
    ],
)
def test_broken(capsys, tmp_path, all_linear_adapter, tiny_dir, name, kwargs, code) -> None:
    src = write_variant(all_linear_adapter, tmp_path / name, **kwargs)
    rc, report = inspect_json(capsys, src, "--base", str(tiny_dir))
    assert rc == 3 and report["status"] == "broken"
    problem = next(p for p in report["problems"] if p["code"] == code)
    assert problem["severity"] == "broken" and problem["fix"]
    assert str(src) in problem["message"]
    assert verdict(report, "vLLM 0.32")["status"] == "fails"
    assert verdict(report, "vLLM + gemma4-bridge")["status"] == "fails"


def test_lm_head_lora_is_named_not_blamed_on_the_base(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    """PEFT with lm_head in target_modules (tied to embed_tokens) saves its LoRA and the whole table:
    refused as what it is, not as 'trained for another model'."""
    head = "base_model.model.lm_head"
    extra = {f"{head}.lora_A.weight": torch.ones(4, 64), f"{head}.lora_B.weight": torch.ones(512, 4), f"{head}.base_layer.weight": torch.ones(512, 64)}
    src = write_variant(all_linear_adapter, tmp_path / "lm_head", extra=extra)
    rc, report = inspect_json(capsys, src, "--base", str(tiny_dir))
    codes = {p["code"]: p for p in report["problems"]}
    assert rc == 3 and "unknown-module" not in codes, codes
    assert codes["tied-output-lora"]["tensors"] and "embed_tokens" in codes["tied-output-lora"]["message"]
    assert codes["saved-embedding-table"]["tensors"] == [f"{head}.base_layer.weight"]
    assert "target_modules" in codes["tied-output-lora"]["fix"]


def test_nan_scan_can_be_skipped(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    src = write_variant(all_linear_adapter, tmp_path / "nan", transform=lambda k, v: v * float("nan") if k == B_KEY else v)
    rc, _ = inspect_json(capsys, src, "--base", str(tiny_dir), "--no-scan")
    assert rc == 0


def test_text_adapter_regex_and_sglang(capsys, text_adapter, tiny_dir) -> None:
    """PEFT's regex target_modules: fixable; SGLang rejects the regex; towers absent so no tower notes."""
    rc, report = inspect_json(capsys, text_adapter, "--base", str(tiny_dir))
    assert rc == 1 and "regex-target-modules" in report["flavours"]
    sglang = verdict(report, "SGLang")
    assert sglang["status"] == "fails" and any("regex" in n for n in sglang["notes"])
    assert not any("tower" in n for n in verdict(report, "vLLM 0.32")["notes"])


def test_without_base(capsys, tmp_path, all_linear_adapter) -> None:
    src = write_variant(all_linear_adapter, tmp_path / "nobase", rename=default_adapter_name,
                        config_update={"base_model_name_or_path": "google/gemma-4-E4B-it"})  # fmt: skip
    rc, report = inspect_json(capsys, src)
    assert rc == 1 and report["base"] is None
    assert any(p["code"] == "no-base" and "--base" in p["fix"] for p in report["problems"])


def test_human_report(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    src = write_variant(all_linear_adapter, tmp_path / "human", rename=default_adapter_name)
    rc = main(["inspect", str(src), "--base", str(tiny_dir)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "flavour:  adapter-name-in-keys" in out
    assert f"gemma4-bridge convert {src} -o OUT --base {tiny_dir}" in out
    assert "vLLM 0.32 (stock)" in out and "SGLang 0.5.23 (stock)" in out
