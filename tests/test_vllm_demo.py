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
    rows = _table_rows(proc.stdout)
    for name in ("base model", "text (PEFT, regex targets)", "towers, hand-saved keys", "text, vLLM naming", "text + k/v on KV-shared layers",
                 "PEFT all-linear (audio relative_k_proj)"):  # fmt: skip
        assert name in rows, proc.stdout
        diff = float(re.findall(r"(\d\.\de[-+]\d\d)", rows[name])[0])
        assert diff < 1e-3, rows[name]
    assert not any((tmp_path / "demo" / "adapters").rglob("*.tmp-*")), "nothing half-written next to the adapters"
    # Issue 13.5: third-party logs go to demo.log, the table is the last thing printed, nothing is cut.
    lines = proc.stdout.rstrip().splitlines()
    assert all(line.startswith("[demo]") for line in lines[: lines.index("")]), proc.stdout
    assert lines[-1].startswith((" ", "ZeRO-3", "PEFT all-linear")) and '{"tolerance"' not in proc.stdout, proc.stdout
    assert not proc.stderr.strip(), proc.stderr[-3000:]
    assert "vLLM plugin active" in (tmp_path / "demo" / "demo.log").read_text()
    sep = next(line for line in lines if line and set(line) == {"-"})
    assert all(len(line) <= len(sep) for line in lines[lines.index(sep) :]), "cells wrap within their columns"


def _table_rows(stdout: str) -> dict[str, str]:
    """{adapter: the row's other cells joined}: a row is a line starting in column 0 (adapter names
    never wrap) plus its wrapped continuation lines, which start with spaces."""
    table = stdout.split("\n-", 1)[1].splitlines()[1:]
    rows: dict[str, list[str]] = {}
    for line in table:
        if line and not line.startswith(" "):
            name, _, rest = line.partition("  ")
            rows[name] = [rest]
        else:
            rows[name].append(line)
    return {name: " ".join(" ".join(p.split()) for p in parts) for name, parts in rows.items()}
