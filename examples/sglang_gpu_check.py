"""GPU check: a real SGLang server with gemma4-bridge's Gemma 4 class vs transformers + PEFT.

Launches ``python -m sglang.launch_server`` (the plugin is picked up from the installed entry point,
or with ``--route env`` through SGLANG_EXTERNAL_MODEL_PACKAGE), serves LoRA adapters given at start
and loaded at run time, and compares the prompt log-probabilities the server returns with those of
transformers + PEFT on the same tokens. It also checks that the server logged our class as active
and that an adapter with tower LoRA is refused with gemma4-bridge's message.

Needs a CUDA GPU and ``pip install "gemma4-bridge[sglang]" peft``. With no --model, it builds the
tiny Gemma 4 of the test suite (sliding/full head sizes, KV-shared layers, k_eq_v, double-wide MLP)
and real PEFT adapters for it, then the tiny 12B Unified of the family tests (encoder-free
embedders: SGLang builds it only with the plugin's config hook) with a language-model adapter and
an embedder adapter that must be refused; one server each, so it runs in a few minutes on any GPU:

    python examples/sglang_gpu_check.py                        # tiny model, float32
    python examples/sglang_gpu_check.py --model /models/gemma-4-E2B-it --adapter mine=/ckpt/lora \\
        --dtype bfloat16 --tolerance 0.05                       # your own model and adapter

Exit status 0 when every adapter matches within --tolerance (max |logprob difference| per token).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PROMPTS = [
    "the quick brown fox jumps over the lazy dog. gemma four adapters serve what was trained.",
    "shared key value layers reuse the cache of an earlier layer, a sentence about numbers one two three.",
]
TEXT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# (label, model, {name: adapter} that must serve PEFT's numbers, refused adapter or None, words its refusal must contain)
Check = tuple[str, Path, dict[str, Path], Path | None, tuple[str, ...]]


def build_tiny(workdir: Path) -> Check:
    """Tiny Gemma 4 plus adapters: regex text LoRA, PEFT's q/v default, rsLoRA with patterns; and an all-linear one (towers)."""
    from gemma4_bridge.testing.fixtures import build_tiny_gemma4, variant, write_peft_adapter

    model = build_tiny_gemma4(workdir / "model", variant(double_wide_mlp=True))
    adapters = {
        "text": write_peft_adapter(model, workdir / "text", target_modules=TEXT_TARGETS, seed=2),
        "qv": write_peft_adapter(model, workdir / "qv", target_modules=r".*language_model\..*\.(q_proj|v_proj)", seed=3),
        "rslora": write_peft_adapter(
            model, workdir / "rslora", target_modules=TEXT_TARGETS, seed=4, use_rslora=True, rank_pattern={"o_proj": 2}
        ),
    }
    towers = write_peft_adapter(model, workdir / "all_linear", seed=5)
    return "tiny Gemma 4 (E-series layers)", model, adapters, towers, ("gemma4-bridge", "tower")


def build_tiny_unified(workdir: Path) -> Check:
    """Tiny 12B Unified plus a language-model adapter (k_proj on its k_eq_v layer included) and an embedder one."""
    from gemma4_bridge.testing.family import build_family_member, family_spec, write_family_adapter

    model = build_family_member(workdir / "model", family_spec("unified"))
    adapters = {"unified_text": write_family_adapter(model, workdir / "unified_text", target_modules=TEXT_TARGETS, seed=11)}
    embedders = write_family_adapter(
        model, workdir / "embedders", target_modules=r".*(language_model.*\.q_proj|patch_dense|embedding_projection)", seed=13
    )
    return "tiny 12B Unified", model, adapters, embedders, ("gemma4-bridge", "language model only", "gemma4-bridge merge")


def hf_prompt_logprobs(model_dir: Path, adapter: Path | None, token_ids: list[list[int]], dtype: str) -> list[list[float]]:
    """log p(token_i | tokens_<i) for i >= 1, from transformers (+ PEFT), eager attention."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="eager")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model = model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    with torch.no_grad():
        for ids in token_ids:
            x = torch.tensor([ids], device=model.device)
            logp = torch.log_softmax(model(input_ids=x).logits.float()[0], dim=-1)
            out.append([logp[i - 1, ids[i]].item() for i in range(1, len(ids))])
    return out


def post(url: str, payload: dict[str, Any], timeout: float = 120) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def server_prompt_logprobs(base: str, token_ids: list[list[int]], lora: str | None) -> list[list[float]]:
    out = []
    for ids in token_ids:
        payload: dict[str, Any] = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        if lora:
            payload["lora_path"] = lora
        status, body = post(f"{base}/generate", payload)
        if status != 200:
            raise RuntimeError(f"/generate answered {status}: {body}")
        out.append([entry[0] for entry in body["meta_info"]["input_token_logprobs"][1:]])
    return out


def launch(args: argparse.Namespace, model: Path, at_start: dict[str, Path], log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if args.route == "env":
        env["SGLANG_EXTERNAL_MODEL_PACKAGE"] = "gemma4_bridge.plugins.sglang"
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--host", "127.0.0.1",
        "--port", str(args.port), "--dtype", args.dtype, "--enable-lora", "--max-lora-rank", str(args.max_lora_rank),
        "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "--max-loras-per-batch", str(len(at_start) + 3), "--lora-paths",
        *[f"{name}={path}" for name, path in at_start.items()], "--mem-fraction-static", "0.3",
        *args.server_arg,
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); last log lines:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    raise RuntimeError(f"the server was not healthy after {timeout:.0f} s; last log lines:\n{log_tail(log_path)}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and the processes it started (its own process group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def check(args: argparse.Namespace, spec: Check, workdir: Path) -> list[str]:
    """Serve ``spec``'s model and adapters with one SGLang server; the failures found."""
    label, model, adapters, refused, refusal_words = spec
    names = list(adapters)
    at_start = {n: adapters[n] for n in names[::2]}  # the rest is loaded at run time (/load_lora_adapter)

    from transformers import AutoTokenizer

    print(f"\n== {label}: {model}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    token_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    log_path = workdir / "server.log"
    base_url = f"http://127.0.0.1:{args.port}"
    proc = launch(args, model, at_start, log_path)
    failures: list[str] = []
    try:
        wait_healthy(base_url, proc, log_path, args.startup_timeout)
        if "Gemma 4 SGLang class active" not in log_path.read_text(errors="replace"):
            failures.append("the server log does not show gemma4-bridge's class as active")
        for name in names[1::2]:
            status, body = post(f"{base_url}/load_lora_adapter", {"lora_name": name, "lora_path": str(adapters[name])})
            if status != 200:
                failures.append(f"loading {name} at run time failed: {body}")
        reference_base = hf_prompt_logprobs(model, None, token_ids, args.dtype)
        served_base = server_prompt_logprobs(base_url, token_ids, None)
        rows = [("base (no LoRA)", _max_diff(served_base, reference_base), 0.0)]
        for name in names:
            reference = hf_prompt_logprobs(model, adapters[name], token_ids, args.dtype)
            served = server_prompt_logprobs(base_url, token_ids, name)
            rows.append((name, _max_diff(served, reference), _max_diff(reference, reference_base)))
        print(f"\n{'adapter':<18}{'max |SGLang - HF+PEFT|':>24}{'max |LoRA - base| (HF)':>24}")
        for name, diff, effect in rows:
            print(f"{name:<18}{diff:>24.2e}{effect:>24.2e}")
            if diff > args.tolerance:
                failures.append(f"{name}: SGLang differs from transformers + PEFT by {diff:.3e} > {args.tolerance}")
            if name != rows[0][0] and effect <= 10 * args.tolerance:
                failures.append(f"{name}: the adapter barely changes the logprobs ({effect:.2e}); the comparison proves little")
        if refused is not None:
            status, body = post(f"{base_url}/load_lora_adapter", {"lora_name": "refused", "lora_path": str(refused)})
            message = json.dumps(body)
            print(f"\n{refused.name} adapter: HTTP {status}: {message[:300]}")
            if status == 200 or not all(word in message for word in refusal_words):
                failures.append(f"the {refused.name} adapter was not refused with gemma4-bridge's message ({', '.join(refusal_words)})")
    except RuntimeError as err:  # the server did not come up, or a request failed
        failures.append(str(err))
    finally:
        stop(proc)
    print(f"server log: {log_path}")
    return [f"{label}: {failure}" for failure in failures]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", type=Path, help="Gemma 4 model directory (default: build the tiny test models)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="adapter to check (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tolerance", type=float, default=2e-3, help="max |logprob difference| per token (default 2e-3, float32)")
    parser.add_argument("--route", choices=["entry-point", "env"], default="entry-point", help="how SGLang finds the class")
    parser.add_argument("--port", type=int, default=30123)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for sglang.launch_server (repeatable)")
    parser.add_argument("--workdir", type=Path, help="where the tiny models and logs go (default: a temp dir)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sglang-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        runs = [(build_tiny(workdir / "e_series"), workdir / "e_series"), (build_tiny_unified(workdir / "unified"), workdir / "unified")]
    else:
        adapters = {name: Path(path) for name, path in (spec.split("=", 1) for spec in args.adapter)}
        if not adapters:
            parser.error("give at least one --adapter NAME=DIR with --model")
        runs = [((str(args.model), args.model, adapters, None, ()), workdir)]
    failures = [failure for spec, run_dir in runs for failure in check(args, spec, run_dir)]
    for failure in failures:
        print(f"FAIL: {failure}")
    print("OK: SGLang serves every adapter as transformers + PEFT computes it" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


if __name__ == "__main__":
    sys.exit(main())
