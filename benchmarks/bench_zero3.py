"""ZeRO-3 recovery (gemma4-bridge convert) vs DeepSpeed's own zero_to_fp32, on the same checkpoint.

Goals (issues 3 and 11): at least 3x faster, at most 1/4 of zero_to_fp32's peak RSS, against its
default and its best modes (see DS_IMPORT below); a plain copy of our output is timed as the floor.
Checkpoint: DeepSpeed ZeRO-3 on-disk format (written by gemma4_bridge.testing.zero3_job's synthetic writer,
which DeepSpeed's reader accepts - tests check that), 4 ranks, fp32 masters + Adam moments. Cases:
"dense": a rank-64 all-linear adapter on an E4B-shaped layout (~0.8 GB of LoRA weights, ~2.3 GB of
optimizer files); "moe": the same layout with a 128-expert MoE block in every text layer and expert
LoRA (PEFT ``target_parameters`` on the 3-D ``experts.gate_up_proj`` / ``experts.down_proj``, rank 4
per expert: ~0.6 GB, every factor partitioned across the ranks). The damaged adapter beside each has
zero-element tensors for every LoRA factor above DeepSpeed's default persistence threshold (1e5
elements), as a real run saves. Every contender writes safetensors of the fp32 weights; each runs in
a fresh process, after a sync and ``--settle`` seconds (the previous contender's output is being
written back otherwise, which slowed whoever came next 3-5x on this VM).

    .venv/bin/python benchmarks/bench_zero3.py [--case dense moe] [--rounds 3] [--world-size 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))
from _converter_bench import HIDDEN, LAYERS, e4b_config, e4b_shapes, mb, measure, write_sparse_base, write_synthetic_adapter  # noqa: E402

PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's default stage3_param_persistence_threshold
NUM_EXPERTS, MOE_INTER, EXPERT_R = 128, 704, 4  # the "moe" case's experts (26B-A4B-like counts) and per-expert rank
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def build(work: Path, world_size: int, case: str) -> tuple[Path, Path]:
    from safetensors.torch import load_file, save_file

    from gemma4_bridge.testing.zero3_job import write_synthetic_zero3_checkpoint

    work = work if case == "dense" else work / case  # dense where earlier work dirs have it
    base = write_sparse_base(work / "base") if case == "dense" else write_moe_base(work / "base")
    run = work / "checkpoint-100"
    if (run / "latest").is_file():
        return base, run
    if case == "dense":
        write_synthetic_adapter(base, work / "trained", r=64, name_style="default")
    else:
        write_expert_adapter(work / "trained")
    params = load_file(work / "trained" / "adapter_model.safetensors")
    write_synthetic_zero3_checkpoint(params, run, world_size=world_size, step=100, num_groups=1, adam_states=True)
    damaged = {k.replace(".default.", "."): (v if v.numel() < PERSISTENCE_THRESHOLD else v.new_zeros(0)) for k, v in params.items()}
    save_file(damaged, run / "adapter_model.safetensors")
    config = json.loads((work / "trained" / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps(config))
    return base, run


def write_moe_base(out: Path) -> Path:
    """The E4B-shaped sparse base with a MoE block (3-D expert parameters) in every text layer."""
    config = e4b_config()
    config["text_config"].update(enable_moe_block=True, num_experts=NUM_EXPERTS, top_k_experts=8, moe_intermediate_size=MOE_INTER)
    shapes = e4b_shapes()
    for i in range(LAYERS):
        p = f"model.language_model.layers.{i}.experts."
        shapes[p + "gate_up_proj"] = (NUM_EXPERTS, 2 * MOE_INTER, HIDDEN)
        shapes[p + "down_proj"] = (NUM_EXPERTS, HIDDEN, MOE_INTER)
    return write_sparse_base(out, config, shapes)


def write_expert_adapter(out: Path) -> None:
    """PEFT's form of LoRA on both expert parameters of every layer (hand-saved ``.default`` names):
    lora_A [E*r, in], lora_B [out, r*E]; gate_up_proj's keys one ``base_layer`` deeper (wrapped first)."""
    import torch

    from gemma4_bridge.converters.safetensors_stream import TensorSpec, write_streaming

    out.mkdir(parents=True, exist_ok=True)
    specs = []
    for i in range(LAYERS):
        p = f"base_model.model.model.language_model.layers.{i}.experts."
        for nest, (n_out, n_in) in (("base_layer.", (2 * MOE_INTER, HIDDEN)), ("", (HIDDEN, MOE_INTER))):
            specs.append(TensorSpec(f"{p}{nest}lora_A.default.weight", (NUM_EXPERTS * EXPERT_R, n_in), "float32"))
            specs.append(TensorSpec(f"{p}{nest}lora_B.default.weight", (n_out, EXPERT_R * NUM_EXPERTS), "float32"))
    gen = torch.Generator().manual_seed(0)
    write_streaming(out / "adapter_model.safetensors", specs, lambda s: torch.randn(s.shape, generator=gen) * 0.01)
    config = {
        "peft_type": "LORA", "r": EXPERT_R, "lora_alpha": 2 * EXPERT_R, "target_modules": [], "target_parameters": EXPERT_PARAMETERS,
        "bias": "none", "use_rslora": False,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))


# Contenders, each in a fresh process: name -> (imports, work). DeepSpeed's modes (deepspeed 0.19.8
# ``deepspeed/utils/zero_to_fp32.py``): "default" is the documented converter (lazy state dict, 5 GB
# shards, frozen parameters included); "lazy" is its best mode for one output file:
# ``get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True, exclude_frozen_parameters=True)`` then
# ``to_torch_tensor``; "lazy-sharded" is its lowest-memory mode (the same, written in 100 MB shards,
# each freed before the next).
DS_IMPORT = "import torch, safetensors\nfrom deepspeed.utils import zero_to_fp32 as z"


def contenders(run: Path, base: Path, out: Path, ours: Path) -> dict[str, tuple[str, str]]:
    return {
        "gemma4-bridge": (
            "import torch, safetensors\nfrom gemma4_bridge.converters import convert_adapter",
            f"convert_adapter({str(run)!r}, {str(ours)!r}, base={str(base)!r})",
        ),
        # The floor for any converter: writing the recovered bytes once (a plain copy of our output).
        "copy of the output": (
            "import os, shutil",
            f"os.makedirs({str(out)!r})\nshutil.copyfile({str(ours / 'adapter_model.safetensors')!r}, {str(out / 'copy.safetensors')!r})",
        ),
        "zero_to_fp32 default": (DS_IMPORT, f"z.convert_zero_checkpoint_to_fp32_state_dict({str(run)!r}, {str(out)!r}, safe_serialization=True)"),
        "zero_to_fp32 lazy": (
            DS_IMPORT + "\nimport os\nfrom safetensors.torch import save_file",
            f"sd = z.get_fp32_state_dict_from_zero_checkpoint({str(run)!r}, lazy_mode=True, exclude_frozen_parameters=True)\n"
            f"os.makedirs({str(out)!r})\nsave_file(z.to_torch_tensor(sd), os.path.join({str(out)!r}, 'model.safetensors'))",
        ),
        "zero_to_fp32 lazy-sharded": (
            DS_IMPORT,
            f"z.convert_zero_checkpoint_to_fp32_state_dict({str(run)!r}, {str(out)!r}, safe_serialization=True, "
            "exclude_frozen_parameters=True, max_shard_size='100MB')",
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", choices=["dense", "moe"], default=["dense", "moe"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after syncing, before each contender")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_zero3_"))
    for case in args.case:
        run_case(case, work, args)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def run_case(case: str, work: Path, args: argparse.Namespace) -> None:
    base, run = build(work, args.world_size, case)
    tag = run / (run / "latest").read_text().strip()
    optim_bytes = sum(p.stat().st_size for p in tag.glob("*optim_states.pt"))
    print(f"[{case}] checkpoint: {args.world_size} ranks, {mb(optim_bytes)} of optimizer files; adapter {run / 'adapter_model.safetensors'}")
    out, ours_out = run.parent / "out", run.parent / "ours"
    table = contenders(run, base, out, ours_out)
    results: dict[str, list[dict[str, float]]] = {}
    for i in range(args.rounds):
        names = list(table)
        names = names if i % 2 == 0 else names[:1] + names[1:][::-1]  # ours first (the copy needs it), then alternate
        line = []
        for name in names:
            shutil.rmtree(out, ignore_errors=True)
            if name == "gemma4-bridge":
                shutil.rmtree(ours_out, ignore_errors=True)
            os.sync()
            time.sleep(args.settle)
            r = measure(*table[name])
            results.setdefault(name, []).append(r)
            line.append(f"{name} {r['seconds']:.2f} s / {mb(r['peak_rss'])}")
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"[{case}] round {i + 1} (load {load}): " + "; ".join(line), flush=True)
    ours = results.pop("gemma4-bridge")
    for name, theirs in results.items():
        speed = sorted(t["seconds"] / o["seconds"] for o, t in zip(ours, theirs))
        cpu = sorted(t["cpu_seconds"] / o["cpu_seconds"] for o, t in zip(ours, theirs))
        rss = sorted(o["peak_rss"] / t["peak_rss"] for o, t in zip(ours, theirs))
        o_t, t_t = sorted(r["seconds"] for r in ours), sorted(r["seconds"] for r in theirs)
        o_p, t_p = sorted(r["peak_rss"] for r in ours), sorted(r["peak_rss"] for r in theirs)
        goals = name.startswith("zero_to_fp32")  # the copy is a floor to read the others by, not a contender
        print(f"[{case}] vs {name}: {median(speed):.1f}x faster (range {speed[0]:.1f}-{speed[-1]:.1f}x; median {median(o_t):.2f} s vs "
              f"{median(t_t):.2f} s; CPU {median(cpu):.1f}x, range {cpu[0]:.1f}-{cpu[-1]:.1f}x){' (goal >= 3x)' * goals}; peak RSS {median(rss):.2f}x "
              f"(range {rss[0]:.2f}-{rss[-1]:.2f}; median {mb(median(o_p))} vs {mb(median(t_p))}){' (goal <= 0.25)' * goals} over {args.rounds} paired rounds")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
