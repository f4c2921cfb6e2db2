"""Shared pieces of the converter benchmarks: an E4B-shaped layout, synthetic adapters, and a
runner that measures one contender in a fresh process (wall time of the work, peak RSS).

The layout copies Gemma-4-E4B's public dimensions approximately (42 text layers of width 2560,
18 KV-shared, per-layer inputs, a 16-layer vision and a 12-layer audio tower with clippable
linears); the base checkpoint is a *sparse* file (headers real, data holes), enough for
converting, which reads only headers of the base.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, GLOBAL_HEAD_DIM, PLI = 2560, 10240, 42, 8, 2, 256, 512, 256
VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16}
AUDIO = {"hidden_size": 1024, "num_hidden_layers": 12}


def e4b_config() -> dict[str, Any]:
    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    layer_types = [pattern[i % 6] for i in range(LAYERS - 1)] + ["full_attention"]
    return {
        "model_type": "gemma4",
        "architectures": ["Gemma4ForConditionalGeneration"],
        "text_config": {
            "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "global_head_dim": GLOBAL_HEAD_DIM, "vocab_size": 262144,
            "hidden_size_per_layer_input": PLI, "layer_types": layer_types, "num_kv_shared_layers": 18, "attention_k_eq_v": False,
        },
        "vision_config": VISION,
        "audio_config": AUDIO,
    }  # fmt: skip


def e4b_shapes() -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape for the linears (and clip buffers) of the E4B-shaped model."""
    config = e4b_config()["text_config"]
    first_shared = LAYERS - config["num_kv_shared_layers"]
    shapes: dict[str, tuple[int, ...]] = {"model.language_model.embed_tokens.weight": (262144, HIDDEN)}
    for i, kind in enumerate(config["layer_types"]):
        hd = GLOBAL_HEAD_DIM if kind == "full_attention" else HEAD_DIM
        p = f"model.language_model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (HEADS * hd, HIDDEN)
        if i < first_shared:
            shapes[p + "self_attn.k_proj.weight"] = (KV_HEADS * hd, HIDDEN)
            shapes[p + "self_attn.v_proj.weight"] = (KV_HEADS * hd, HIDDEN)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * hd)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "per_layer_input_gate.weight"] = (PLI, HIDDEN)
        shapes[p + "per_layer_projection.weight"] = (HIDDEN, PLI)
    shapes["model.language_model.per_layer_model_projection.weight"] = (LAYERS * PLI, HIDDEN)

    def clippable(path: str, out: int, inp: int) -> None:
        shapes[f"{path}.linear.weight"] = (out, inp)
        for buf in ("input_min", "input_max", "output_min", "output_max"):
            shapes[f"{path}.{buf}"] = ()

    vh, vi = VISION["hidden_size"], VISION["intermediate_size"]
    for i in range(VISION["num_hidden_layers"]):
        p = f"model.vision_tower.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            clippable(p + "self_attn." + proj, vh, vh)
        clippable(p + "mlp.gate_proj", vi, vh)
        clippable(p + "mlp.up_proj", vi, vh)
        clippable(p + "mlp.down_proj", vh, vi)
    ah = AUDIO["hidden_size"]
    for i in range(AUDIO["num_hidden_layers"]):
        p = f"model.audio_tower.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "post"):
            clippable(p + "self_attn." + proj, ah, ah)
        for ff in ("feed_forward1", "feed_forward2"):
            clippable(f"{p}{ff}.ffw_layer_1", 4 * ah, ah)
            clippable(f"{p}{ff}.ffw_layer_2", ah, 4 * ah)
        clippable(p + "lconv1d.linear_start", 2 * ah, ah)
        clippable(p + "lconv1d.linear_end", ah, ah)
    shapes["model.embed_vision.embedding_projection.weight"] = (HIDDEN, vh)
    shapes["model.embed_audio.embedding_projection.weight"] = (HIDDEN, 1536)
    return shapes


def write_sparse_base(out: Path, config: dict[str, Any] | None = None, shapes: dict[str, tuple[int, ...]] | None = None) -> Path:
    """config.json + one bf16 model.safetensors whose data is a hole: real headers, ~no disk.
    E4B-shaped unless ``config`` and ``shapes`` say otherwise."""
    from gemma4_bridge.converters.safetensors_stream import TensorSpec

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config or e4b_config()))
    specs = [TensorSpec(k, v, "bfloat16") for k, v in sorted((shapes or e4b_shapes()).items())]
    header, offset = {}, 0
    for s in specs:
        header[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with (out / "model.safetensors").open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return out


def write_synthetic_adapter(base: Path, out: Path, *, r: int = 64, dtype: str = "float32", name_style: str = "default") -> int:
    """A rank-``r`` all-linear adapter over every LoRA-able linear of ``base``, random values, streamed.

    ``name_style="default"`` writes hand-saved ``.lora_A.default.weight`` keys (so convert renames
    every tensor). Returns the bytes written.
    """
    import torch

    from gemma4_bridge.converters.safetensors_stream import TensorSpec, write_streaming
    from gemma4_bridge.layout import Gemma4Layout

    layout = Gemma4Layout.from_model_dir(base)
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    suffix = ".default.weight" if name_style == "default" else ".weight"
    for site in sorted(layout.linears.values(), key=lambda s: s.path):
        specs.append(TensorSpec(f"base_model.model.{site.path}.lora_A{suffix}", (r, site.in_features), dtype))
        specs.append(TensorSpec(f"base_model.model.{site.path}.lora_B{suffix}", (site.out_features, r), dtype))
    gen = torch.Generator().manual_seed(0)
    write_streaming(out / "adapter_model.safetensors", specs, lambda s: (torch.randn(s.shape, generator=gen) * 0.01).to(getattr(torch, s.dtype)))
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": "all-linear", "bias": "none",
        "base_model_name_or_path": str(base), "use_rslora": False,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    return sum(s.nbytes for s in specs)


def largest_tensor_bytes(path: Path) -> int:
    from gemma4_bridge.layout import read_safetensors_header

    h = read_safetensors_header(path)
    return max(v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__")


_RUNNER = """
import json, os, sys, time
def status(field):  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
def rss_now():
    return status("VmRSS")
{imports}
base_rss = rss_now()
t0, c0 = time.perf_counter(), time.process_time()
{work}
elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = status("VmHWM")
print("@@RESULT@@" + json.dumps({{"seconds": elapsed, "cpu_seconds": cpu, "peak_rss": peak, "base_rss": base_rss}}))
"""


def measure(imports: str, work: str, timeout: float = 1800) -> dict[str, float]:
    """Run ``work`` after ``imports`` in a fresh Python; returns seconds (work only: wall clock, and
    CPU of all its threads, kernel copies included, writeback excluded), peak and post-import RSS."""
    code = _RUNNER.format(imports=textwrap.dedent(imports), work=textwrap.dedent(work))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("@@RESULT@@"))
    return json.loads(line.removeprefix("@@RESULT@@"))


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"
