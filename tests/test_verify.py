"""`gemma4-bridge verify` against real vLLM servers on 127.0.0.1 (issue 13.2).

One stock vLLM server (the plugin disabled through VLLM_PLUGINS, no --enable-tower-connector-lora)
serves two adapters with known serving bugs: `kv` (k_proj LoRA on attention_k_eq_v layers, whose V
stock vLLM 0.32 leaves without the delta) must be caught as wrong numbers, `vision` (vision-tower
LoRA only, which stock vLLM loads and ignores without the flag) as not applied on the image probe.
An unreachable server and a wrong model name exit 2 with one line. The plugin server's passing
check lives in test_vllm_server.py (same server as its other checks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_helpers import api_server, free_port

from gemma4_bridge.cli import main
from gemma4_bridge.testing.fixtures import write_peft_adapter

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def stock(tiny_dir: Path, text_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("verify")
    vision = write_peft_adapter(tiny_dir, root / "vision", target_modules=r".*vision_tower.*\.(q_proj|k_proj|v_proj|o_proj)\.linear", seed=3)
    args = ["--lora-modules", f"kv={text_adapter}", f"vision={vision}", "--limit-mm-per-prompt", '{"image": 1, "audio": 0}']
    with api_server(tiny_dir, args, root / "server.log", {"VLLM_PLUGINS": ""}) as info:
        assert "vLLM plugin active" not in info["log"].read_text()
        yield {**info, "vision": vision, "prompts": _probes_file(root)}


def _probes_file(root: Path) -> Path:
    """A text and an image probe (the stock server runs with audio off)."""
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "cat.png")
    rows = [{"name": "text", "text": "the quick brown fox jumps over the lazy dog"}, {"name": "image", "text": "a picture of a cat", "image": "cat.png"}]
    (root / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "probes.jsonl"


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any] | str, str]:
    code = main(["verify", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in args and out.strip() else out), err


def test_stock_vllm_k_eq_v_lora_caught_as_wrong_numbers(stock: dict[str, Any], tiny_dir: Path, text_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report, _ = _verify(capsys, "--server", stock["url"], "--model", "kv", "--base", str(tiny_dir), "--adapter", str(text_adapter),
                              "--prompts", str(stock["prompts"]), "--json")  # fmt: skip
    assert code == 1, report
    text = next(p for p in report["probes"] if p["probe"] == "text")
    assert text["verdict"] == "partly applied / wrong numbers", report
    assert text["max_diff"] > 0.05 and text["base_diff"] > 0.05, report


def test_stock_vllm_tower_lora_without_flag_caught_as_not_applied(stock: dict[str, Any], tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report, _ = _verify(capsys, "--server", stock["url"], "--model", "vision", "--base", str(tiny_dir), "--adapter", str(stock["vision"]),
                              "--prompts", str(stock["prompts"]), "--json")  # fmt: skip
    assert code == 1, report
    verdicts = {p["probe"]: p["verdict"] for p in report["probes"]}
    assert verdicts == {"text": "ok", "image": "adapter not applied"}, [p["note"] for p in report["probes"]]


def test_wrong_model_name_exits_2_with_one_line(stock: dict[str, Any], tiny_dir: Path, text_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _verify(capsys, "--server", stock["url"], "--model", "no-such-lora", "--base", str(tiny_dir), "--adapter", str(text_adapter))
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "serves no model named 'no-such-lora'" in err and "kv" in err, err


def test_unreachable_server_exits_2_with_one_line(tiny_dir: Path, text_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = _verify(capsys, "--server", url, "--model", "x", "--base", str(tiny_dir), "--adapter", str(text_adapter))
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "cannot reach the server" in err, err


def test_verdicts_and_report_without_a_server() -> None:
    """The three numeric verdicts from known log-probs, and the printed report's last line."""
    import torch

    from gemma4_bridge.verify import NOT_APPLIED, OK, WRONG, Report, format_report, judge

    ref, base = torch.tensor([0.1, 0.3]), torch.tensor([0.4, 0.2])
    ok = judge("a", ref + 1e-4, ref, base, 3, 3, 0.05)
    not_applied = judge("b", base.clone(), ref, base, 3, 3, 0.05)
    wrong = judge("c", torch.tensor([0.25, 0.25]), ref, base, 3, 3, 0.05)
    greedy = judge("d", ref.clone(), ref, base, 3, 4, 0.05)
    assert [r.verdict for r in (ok, not_applied, wrong, greedy)] == [OK, NOT_APPLIED, WRONG, WRONG]
    report = Report("http://x", "vllm", "m", 0.05, [ok, not_applied])
    assert not report.ok and format_report(report).splitlines()[-1] == "result: MISMATCH: b: adapter not applied"


def test_bad_probes_file_exits_2_with_one_line(tmp_path: Path, tiny_dir: Path, text_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.jsonl").write_text('{"text": "fine"}\nnot json\n')
    code, out, err = _verify(capsys, "--server", "http://127.0.0.1:9", "--model", "x", "--base", str(tiny_dir), "--adapter", str(text_adapter),
                             "--prompts", str(tmp_path / "p.jsonl"))  # fmt: skip
    assert code == 2 and not out and len(err.strip().splitlines()) == 1 and "p.jsonl:2" in err, err
