"""`gemma4-bridge demo` end to end (without its DeepSpeed run, which tests/test_zero3.py covers), as a
user runs it: a subprocess, a real vLLM engine, and a table whose numbers must be within 1e-3."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm


def test_demo_serves_every_flavour_like_peft(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gemma4_bridge.cli", "demo", "--workdir", str(tmp_path / "demo"), "--skip-zero3"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    for name in ("base model", "text (PEFT, regex targets)", "towers, hand-saved keys", "text, vLLM naming", "text + k/v on KV-shared layers",
                 "PEFT all-linear (audio relative_k_proj)"):  # fmt: skip
        assert name in rows, proc.stdout
        diff = float(re.findall(r"(\d\.\de[-+]\d\d)\s*$", rows[name])[0])
        assert diff < 1e-3, rows[name]
    assert not any((tmp_path / "demo" / "adapters").rglob("*.tmp-*")), "nothing half-written next to the adapters"
