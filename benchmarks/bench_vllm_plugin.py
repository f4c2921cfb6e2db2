"""What the vLLM plugin costs, measured side by side in one run (CPU, float32, OMP_NUM_THREADS=1).

1. Adapter loads, plugin vs vLLM's in-tree path (plugin hook bypassed, canonical adapter), on the
   tiny Gemma 4's adapter and on a rank-64 all-linear E4B-shaped one (~760 MB, hand-saved names):
   * event-loop stall: the API server's front end copies a new adapter version into a private
     snapshot and checks every value (plugins/vllm/snapshot.py); run here as the server runs it
     (``hooks._validated_path_off_loop`` in an asyncio loop, copy + check in a worker thread) while
     a 1 ms ticker records the loop's longest gap: the longest any concurrent request waits. Goal:
     <= the in-tree load (the engine waits as long for that).
   * first request: front end (copy + check, wall) + the worker's load of the validated snapshot
     vs the in-tree load. Goal <= 1.2x.
   * worker load: ``LoRAModel.from_local_checkpoint`` as the worker calls it on the validated
     snapshot (what it loads when serving; values not re-read) vs in-tree, each followed by the copy
     into the LoRA layers (the in-tree load reads the mapped values only then). Goal <= 1.2x.
2. Decode tokens/s with the plugin active vs plain vLLM (VLLM_PLUGINS=none), same adapter, same
   prompts: two engines alive at once in their own processes (an engine cannot unload a plugin),
   one timed generate each per round, order alternating. Reported per round as a ratio by wall
   clock and per CPU second of the engine process (less sensitive to other load on a shared box),
   median and range over the rounds. Goal >= 0.98.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vllm_plugin.py [--rounds 20] [--e4b-rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ENGINE = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
model, adapter, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = LLM(model, dtype="float32", enforce_eager=True, max_model_len=512, enable_lora=True, max_lora_rank=8, seed=0,
          limit_mm_per_prompt={"image": 0, "audio": 0})
lora = LoRARequest("a", 1, adapter)
params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0)
prompts = ["the quick brown fox"] * 4
llm.generate(prompts, params, lora_request=lora, use_tqdm=False)  # warm-up (adapter load, first kernels)
print("READY " + type(llm.apply_model(lambda m: m)[0]).__name__, flush=True)
for _ in sys.stdin:  # one timed generate per line the driver sends
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"tokens": n, "wall": wall, "cpu": cpu}), flush=True)
"""


class _Engine:
    """One offline vLLM engine in its own process (an engine cannot unload a plugin), kept alive
    so that the two engines' timed generates can alternate a few seconds apart."""

    def __init__(self, model: Path, adapter: Path, tokens: int, plugin: bool, log: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if not plugin:
            env["VLLM_PLUGINS"] = "none"
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-c", _ENGINE, str(model), str(adapter), str(tokens)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)  # fmt: skip
        self.model_class = self._line("READY ")

    def _line(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()
        raise RuntimeError(f"engine exited ({self.proc.wait()}); see {self.log.name}")

    def generate(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self._line("RESULT "))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()


def _decode_rounds(model: Path, adapter: Path, tokens: int, rounds: int, work: Path) -> dict[str, list[float]]:
    """Per round, one generate on each engine (order alternating): tokens/s by wall clock and by
    the engine process's CPU time, the latter much less sensitive to other load on the box."""
    plugin = _Engine(model, adapter, tokens, True, work / "engine_plugin.log")
    try:
        plain = _Engine(model, adapter, tokens, False, work / "engine_plain.log")
        try:
            assert plugin.model_class.startswith("Bridge") and not plain.model_class.startswith("Bridge"), (plugin.model_class, plain.model_class)
            out: dict[str, list[float]] = {"wall_plugin": [], "wall_plain": [], "cpu_plugin": [], "cpu_plain": []}
            for i in range(rounds):
                order = [("plugin", plugin), ("plain", plain)][:: 1 if i % 2 == 0 else -1]
                for name, engine in order:
                    r = engine.generate()
                    out[f"wall_{name}"].append(r["tokens"] / r["wall"])
                    out[f"cpu_{name}"].append(r["tokens"] / r["cpu"])
            return out
        finally:
            plain.close()
    finally:
        plugin.close()


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    v = sorted(values)
    mid = len(v) // 2
    return ((v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2), v[0], v[-1])


def _worker_loaders(layout_dir: Path, max_rank: int) -> tuple[Any, Any, Any]:
    """(plugin load, in-tree load, front end) as vLLM calls them, each taking an adapter dir."""
    from types import SimpleNamespace

    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration

    import gemma4_bridge.plugins.vllm as plugin
    from gemma4_bridge.layout import Gemma4Layout
    from gemma4_bridge.plugins.vllm.adapter import ServingContext
    from gemma4_bridge.plugins.vllm.model import BridgeWeightsMapper

    plugin.register()
    rename = Gemma4ForConditionalGeneration.hf_to_vllm_mapper.get_rename_mapper()
    ctx = ServingContext(Gemma4Layout.from_model_dir(layout_dir), enable_tower_connector_lora=True, max_lora_rank=max_rank)
    tagged = BridgeWeightsMapper(**{k: getattr(rename, k) for k in rename.__dataclass_fields__}, serving=ctx)
    processor = SimpleNamespace(_gemma4_bridge_ctx=ctx)  # the API server's InputProcessor, as the hooks read it

    def load(mapper: Any) -> Any:
        def call(path: Path) -> Any:
            from safetensors import safe_open

            with safe_open(path / "adapter_model.safetensors", "pt") as f:  # the modules vLLM would have wrapped
                expected = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in f.keys()}
            helper = PEFTHelper.from_local_dir(str(path), 1024)
            return LoRAModel.from_local_checkpoint(str(path), expected, helper, lora_model_id=1, device="cpu", weights_mapper=mapper)

        return call

    from gemma4_bridge.plugins.vllm import hooks, snapshot

    checked = hooks._validated_path
    thread_cpu = [0.0]

    def timed_check(*args: Any) -> Any:  # the copy + check's own CPU (its thread's; the ticker excluded)
        c0 = time.thread_time()
        try:
            return checked(*args)
        finally:
            thread_cpu[0] = time.thread_time() - c0

    hooks._validated_path = timed_check

    def front_end(path: Path) -> tuple[Path, float, float]:
        """(validated snapshot, longest event-loop gap in s, CPU s of the copy + check) of a new adapter
        version, as the API server's front end makes it (hooks._validated_path_off_loop: off the loop)."""
        import asyncio

        snapshot._VERDICTS.clear()  # a fresh file version each round, as after an update

        async def run() -> tuple[str, float]:
            gaps, done = [0.0], asyncio.Event()

            async def ticker() -> None:
                last = time.perf_counter()
                while not done.is_set():
                    await asyncio.sleep(0.001)
                    now = time.perf_counter()
                    gaps[0] = max(gaps[0], now - last - 0.001)
                    last = now

            tick = asyncio.ensure_future(ticker())
            await asyncio.sleep(0)
            served = await hooks._validated_path_off_loop(processor, str(path))
            done.set()
            await tick
            return served, gaps[0]

        served, stall = asyncio.run(run())
        return Path(served), stall, thread_cpu[0]

    return load(tagged), load(rename), front_end


class _StackedBuffer:
    """What the worker does next with a loaded adapter, on both paths: copy every LoRA weight into
    the LoRA layers' preallocated stacked buffers (``set_lora``). vLLM's in-tree load returns
    tensors mapped from the file and reads their pages only here, so a load is timed with it."""

    def __init__(self, *models: Any) -> None:
        import torch

        self.buffer = torch.zeros(max(sum(w.numel() for lora in m.loras.values() for w in (lora.lora_a, lora.lora_b)) for m in models))

    def activate(self, model: Any) -> Any:
        at = 0
        for lora in model.loras.values():
            for w in (lora.lora_a, lora.lora_b):
                self.buffer[at : at + w.numel()].copy_(w.reshape(-1))
                at += w.numel()
        return model


def _load_latency(layout_dir: Path, raw: Path, canonical: Path, rounds: int, max_rank: int) -> dict[str, list[float]]:
    """Per round: the front end on a new version of ``raw`` (wall, CPU of all threads, longest
    event-loop gap), then the worker's plugin load of the snapshot it made, and the in-tree load of
    ``canonical`` before or after that pair (order alternating); each load with the copy into the
    LoRA layers that follows it."""
    plugin_load, intree_load, front_end = _worker_loaders(layout_dir, max_rank)
    warm, _, _ = front_end(raw)
    stacked = _StackedBuffer(intree_load(canonical), plugin_load(warm))
    shutil.rmtree(warm)
    times: dict[str, list[float]] = {f"{k}_{clock}": [] for k in ("front_end", "plugin", "intree") for clock in ("wall", "cpu")}
    times["front_end_stall"], times["front_end_thread_cpu"] = [], []

    def timed(name: str, fn: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        times[f"{name}_wall"].append(time.perf_counter() - t0)
        times[f"{name}_cpu"].append(time.process_time() - c0)
        return result

    for i in range(rounds):
        def plugin_path() -> None:
            served, stall, cpu = timed("front_end", lambda: front_end(raw))
            times["front_end_stall"].append(stall)
            times["front_end_thread_cpu"].append(cpu)
            timed("plugin", lambda: stacked.activate(plugin_load(served)))
            shutil.rmtree(served)

        def intree_path() -> None:
            timed("intree", lambda: stacked.activate(intree_load(canonical)))

        for path in ((plugin_path, intree_path) if i % 2 == 0 else (intree_path, plugin_path)):
            path()
    return times


def _e4b_load(work: Path, rounds: int) -> dict[str, list[float]]:
    """Front end and worker load of a rank-64 all-linear E4B-shaped adapter (~760 MB fp32,
    hand-saved names), files in the page cache (just written)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _converter_bench import write_sparse_base, write_synthetic_adapter

    from gemma4_bridge.converters import convert_adapter

    base = write_sparse_base(work / "e4b_base")
    raw = work / "e4b_raw"
    write_synthetic_adapter(base, raw, r=64)
    convert_adapter(raw, work / "e4b_canonical", base=base)
    return _load_latency(base, raw, work / "e4b_canonical", rounds, 64)


def run(tokens: int, rounds: int, load_rounds: int, e4b_rounds: int) -> dict[str, Any]:
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
    tiny = _load_latency(model, raw, canonical, load_rounds, 8)
    e4b = _e4b_load(work, e4b_rounds) if e4b_rounds else {}
    rates = _decode_rounds(model, canonical, tokens, rounds, work) if rounds else {}
    shutil.rmtree(work, ignore_errors=True)
    return {
        **{f"load_tiny_{k}": v for k, v in tiny.items()},
        **{f"load_e4b_{k}": v for k, v in e4b.items()},
        **{f"decode_{k}": v for k, v in rates.items()},
        "decode_ratio_wall": [a / b for a, b in zip(rates.get("wall_plugin", []), rates.get("wall_plain", []))],
        "decode_ratio_cpu": [a / b for a, b in zip(rates.get("cpu_plugin", []), rates.get("cpu_plain", []))],
    }


def _rename_to_default_adapter_name(adapter: Path) -> None:
    """Rewrite keys as hand-saved adapters have them (``.lora_A.default.weight``): a raw flavour."""
    import re

    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = {re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k): v for k, v in load_file(path).items()}
    save_file(tensors, path)


def _report(res: dict[str, Any]) -> bool:
    def fmt(values: list[float], scale: float = 1.0, unit: str = "") -> str:
        med, lo, hi = spread([v * scale for v in values])
        return f"{med:.3g}{unit} (range {lo:.3g}-{hi:.3g}, n={len(values)})"

    ok = True
    for size in ("tiny", "e4b"):
        if f"load_{size}_plugin_wall" not in res:
            continue
        r = {k.removeprefix(f"load_{size}_"): v for k, v in res.items() if k.startswith(f"load_{size}_")}
        intree = r["intree_wall"]
        print(f"{size} adapter: in-tree load + copy into the LoRA layers {fmt(intree, 1e3, ' ms')} wall, {fmt(r['intree_cpu'], 1e3, ' ms')} CPU")
        print(f"  event-loop stall while the front end copies + checks a new version: {fmt(r['front_end_stall'], 1e3, ' ms')} = "
              f"{fmt([a / b for a, b in zip(r['front_end_stall'], intree)], unit='x')} the in-tree load (goal <= 1x); "
              f"the front end itself (off the loop): {fmt(r['front_end_wall'], 1e3, ' ms')} wall, "
              f"{fmt(r['front_end_thread_cpu'], 1e3, ' ms')} CPU = {fmt([a / b for a, b in zip(r['front_end_thread_cpu'], r['intree_cpu'])], unit='x')} in-tree's")  # fmt: skip
        first = [(f + a) / b for f, a, b in zip(r["front_end_wall"], r["plugin_wall"], intree)]
        first_cpu = [(f + a) / b for f, a, b in zip(r["front_end_thread_cpu"], r["plugin_cpu"], r["intree_cpu"])]
        print(f"  first request (front end + worker load of the snapshot) vs in-tree: wall {fmt(first, unit='x')}, "
              f"CPU {fmt(first_cpu, unit='x')} (goal <= 1.2x)")  # fmt: skip
        for clock in ("wall", "cpu"):
            ratio = [a / b for a, b in zip(r[f"plugin_{clock}"], r[f"intree_{clock}"])]
            print(f"  worker load of the validated snapshot + copy into the LoRA layers, {clock}: {fmt(r[f'plugin_{clock}'], 1e3, ' ms')}"
                  f" = {fmt(ratio, unit='x')} in-tree (goal <= 1.2x)")  # fmt: skip
        if size == "e4b":
            ok &= spread([a / b for a, b in zip(r["front_end_stall"], intree)])[0] <= 1.0 and spread(first_cpu)[0] <= 1.2
    if res["decode_ratio_wall"]:
        print(f"decode tok/s: plugin {fmt(res['decode_wall_plugin'])}, plain vLLM {fmt(res['decode_wall_plain'])}")
        print(f"  plugin/plain per round: wall clock {fmt(res['decode_ratio_wall'])}; "
              f"per CPU second {fmt(res['decode_ratio_cpu'])} (goal >= 0.98)")  # fmt: skip
        ok &= spread(res["decode_ratio_cpu"])[0] >= 0.98
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20, help="alternating plugin/plain decode rounds (0: skip)")
    parser.add_argument("--load-rounds", type=int, default=9, help="alternating load rounds, tiny adapter")
    parser.add_argument("--e4b-rounds", type=int, default=5, help="alternating load rounds, E4B-shaped adapter (0: skip)")
    ns = parser.parse_args()
    sys.exit(0 if _report(run(ns.tokens, ns.rounds, ns.load_rounds, ns.e4b_rounds)) else 1)
