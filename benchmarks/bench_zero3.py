"""ZeRO-3 recovery (gemma4-bridge convert) vs DeepSpeed's own zero_to_fp32, on the same checkpoint.

Goals (issue 3): at least 3x faster, at most 1/4 of zero_to_fp32's peak RSS.
Checkpoint: DeepSpeed ZeRO-3 on-disk format (written by gemma4_bridge.testing.zero3_job's synthetic writer,
which DeepSpeed's reader accepts - tests check that), 4 ranks, fp32 masters + Adam moments, for a
rank-64 all-linear adapter on an E4B-shaped layout (~0.8 GB of LoRA weights, ~2.3 GB of optimizer
files). The damaged adapter beside it has zero-element tensors for every LoRA factor above
DeepSpeed's default persistence threshold (1e5 elements), as a real run saves.
Both contenders write a safetensors file of the fp32 weights; each runs in a fresh process.

    .venv/bin/python benchmarks/bench_zero3.py [--rounds 2] [--world-size 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_zero3_"))
    base, run = build(work, args.world_size)
    tag = run / (run / "latest").read_text().strip()
    optim_bytes = sum(p.stat().st_size for p in tag.glob("*optim_states.pt"))
    print(f"checkpoint: {args.world_size} ranks, {mb(optim_bytes)} of optimizer files; adapter {run / 'adapter_model.safetensors'}")
    ours, theirs = [], []
    for i in range(args.rounds):
        for out in (work / "ours", work / "theirs"):
            shutil.rmtree(out, ignore_errors=True)
        o = measure(
            "import torch, safetensors\nfrom gemma4_bridge.converters import convert_adapter",
            f"convert_adapter({str(run)!r}, {str(work / 'ours')!r}, base={str(base)!r})",
        )
        t = measure(
            "import torch, safetensors\nfrom deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict",
            f"convert_zero_checkpoint_to_fp32_state_dict({str(run)!r}, {str(work / 'theirs')!r}, safe_serialization=True)",
        )
        ours.append(o)
        theirs.append(t)
        print(f"round {i + 1}: gemma4-bridge {o['seconds']:.2f} s / peak {mb(o['peak_rss'])}; "
              f"zero_to_fp32 {t['seconds']:.2f} s / peak {mb(t['peak_rss'])}")  # fmt: skip
    o_t, t_t = min(r["seconds"] for r in ours), min(r["seconds"] for r in theirs)
    o_peak, t_peak = max(r["peak_rss"] for r in ours), max(r["peak_rss"] for r in theirs)
    o_growth, t_growth = max(r["peak_rss"] - r["base_rss"] for r in ours), max(r["peak_rss"] - r["base_rss"] for r in theirs)
    ratios = sorted(t["seconds"] / o["seconds"] for o, t in zip(ours, theirs))
    print(f"speed: gemma4-bridge is {ratios[len(ratios) // 2]:.1f}x faster than zero_to_fp32, median of {args.rounds} paired "
          f"rounds (range {ratios[0]:.1f}-{ratios[-1]:.1f}x; best times {o_t:.2f} s vs {t_t:.2f} s) (goal >= 3x)")  # fmt: skip
    print(f"peak RSS: gemma4-bridge / zero_to_fp32 = {o_peak / t_peak:.2f} (goal <= 0.25) [{mb(o_peak)} vs {mb(t_peak)}]; "
          f"above post-import baseline: {mb(o_growth)} vs {mb(t_growth)} = {o_growth / max(t_growth, 1):.3f}")  # fmt: skip
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
