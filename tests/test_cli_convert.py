"""The converter CLI as users run it: --help that teaches, progress on a terminal only, clean errors."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_bridge.cli import main


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gemma4_bridge.cli", *argv], env=env, timeout=120, **kwargs)


@pytest.mark.parametrize("command", ["inspect", "convert", "merge"])
def test_help_teaches(capsys, command: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "examples:" in out and f"gemma4-bridge {command} " in out
    assert "--base" in out and "--debug" in out
    if command != "inspect":
        assert "--force" in out and "--zero3-checkpoint" in out


def test_top_level_help_lists_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("inspect", "convert", "merge"):
        assert command in out


def test_progress_only_on_a_terminal(tmp_path: Path, all_linear_adapter: Path, tiny_dir: Path) -> None:
    piped = _run(["merge", str(all_linear_adapter), "--base", str(tiny_dir), "-o", str(tmp_path / "a")], capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert "merge:" not in piped.stderr and "%|" not in piped.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemma4_bridge.cli", "merge", str(all_linear_adapter), "--base", str(tiny_dir), "-o", str(tmp_path / "b")],
        stdout=subprocess.DEVNULL, stderr=slave, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    tty_err = b"".join(chunks).decode(errors="replace")
    assert "merge:" in tty_err and "%" in tty_err, tty_err


def test_subprocess_error_has_no_traceback(tmp_path: Path, tiny_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run(["convert", str(empty), "-o", str(tmp_path / "o"), "--base", str(tiny_dir)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("gemma4-bridge convert: error:")
    debug = _run(["convert", str(empty), "-o", str(tmp_path / "o"), "--base", str(tiny_dir), "--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
