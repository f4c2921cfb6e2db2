"""ZeRO-3 recovery (gemma4-bridge convert) vs DeepSpeed's own zero_to_fp32, on the same checkpoint.

Goals (issues 3 and 11): at least 3x faster, at most 1/4 of zero_to_fp32's peak RSS, against its
default and its best modes (see DS_IMPORT below); a plain copy of our output is timed as the floor.
Checkpoint: DeepSpeed ZeRO-3 on-disk format (written by gemma4_bridge.testing.zero3_job's synthetic writer,
which DeepSpeed's reader accepts - tests check that), 4 ranks, fp32 masters + Adam moments, for a
rank-64 all-linear adapter on an E4B-shaped layout (~0.8 GB of LoRA weights, ~2.3 GB of optimizer
files). The damaged adapter beside it has zero-element tensors for every LoRA factor above
DeepSpeed's default persistence threshold (1e5 elements), as a real run saves.
Every contender writes safetensors of the fp32 weights; each runs in a fresh process.

    .venv/bin/python benchmarks/bench_zero3.py [--rounds 3] [--world-size 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))
from _converter_bench import mb, measure, write_sparse_base, write_synthetic_adapter  # noqa: E402

PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's default stage3_param_persistence_threshold


def build(work: Path, world_size: int) -> tuple[Path, Path]:
    from safetensors.torch import load_file, save_file

    from gemma4_bridge.testing.zero3_job import write_synthetic_zero3_checkpoint

    base = write_sparse_base(work / "base")
    run = work / "checkpoint-100"
    if (run / "latest").is_file():
        return base, run
    write_synthetic_adapter(base, work / "trained", r=64, name_style="default")
    params = load_file(work / "trained" / "adapter_model.safetensors")
    write_synthetic_zero3_checkpoint(params, run, world_size=world_size, step=100, num_groups=1, adam_states=True)
    damaged = {k.replace(".default.", "."): (v if v.numel() < PERSISTENCE_THRESHOLD else v.new_zeros(0)) for k, v in params.items()}
    save_file(damaged, run / "adapter_model.safetensors")
    config = json.loads((work / "trained" / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps(config))
    return base, run


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_zero3_"))
    base, run = build(work, args.world_size)
    tag = run / (run / "latest").read_text().strip()
    optim_bytes = sum(p.stat().st_size for p in tag.glob("*optim_states.pt"))
    print(f"checkpoint: {args.world_size} ranks, {mb(optim_bytes)} of optimizer files; adapter {run / 'adapter_model.safetensors'}")
    out, ours_out = work / "out", work / "ours"
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
            r = measure(*table[name])
            results.setdefault(name, []).append(r)
            line.append(f"{name} {r['seconds']:.2f} s / {mb(r['peak_rss'])}")
        print(f"round {i + 1}: " + "; ".join(line), flush=True)
    ours = results.pop("gemma4-bridge")
    for name, theirs in results.items():
        speed = sorted(t["seconds"] / o["seconds"] for o, t in zip(ours, theirs))
        rss = sorted(o["peak_rss"] / t["peak_rss"] for o, t in zip(ours, theirs))
        o_t, t_t = sorted(r["seconds"] for r in ours), sorted(r["seconds"] for r in theirs)
        o_p, t_p = sorted(r["peak_rss"] for r in ours), sorted(r["peak_rss"] for r in theirs)
        print(f"vs {name}: {median(speed):.1f}x faster (range {speed[0]:.1f}-{speed[-1]:.1f}x; median {median(o_t):.2f} s vs "
              f"{median(t_t):.2f} s) (goal >= 3x); peak RSS {median(rss):.2f}x (range {rss[0]:.2f}-{rss[-1]:.2f}; median "
              f"{mb(median(o_p))} vs {mb(median(t_p))}) (goal <= 0.25) over {args.rounds} paired rounds")  # fmt: skip
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
