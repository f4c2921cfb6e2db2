"""merge peak RSS (and time) vs PEFT's load + merge_and_unload + save_pretrained, side by side.

Goal (issue 3): merge's peak memory is bounded by one shard, not by the model.
Base: a real, randomly initialised Gemma 4 (text + vision + audio, clippable towers) of ~1 GB fp32,
saved in 250 MB shards; adapter: rank-64 all-linear over every linear (synthetic values).
The E4B-shaped layout of the other benchmarks is not used here: PEFT's path must load the whole
model, which an E4B-sized model makes impossible on the 24 GB box shared by the test suite.
Each contender runs in a fresh process.

    .venv/bin/python benchmarks/bench_merge.py [--rounds 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _converter_bench import mb, measure, write_synthetic_adapter  # noqa: E402


def build_base(out: Path) -> Path:
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from gemma4_bridge.testing.fixtures import tiny_config_dict

    if (out / "config.json").is_file():
        return out
    cfg = tiny_config_dict(__import__("gemma4_bridge.testing.fixtures", fromlist=["TinySpec"]).TinySpec(num_hidden_layers=12))
    cfg["text_config"].update(
        vocab_size=32768, vocab_size_per_layer_input=32768, hidden_size=1024, intermediate_size=4096,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, global_head_dim=256, hidden_size_per_layer_input=64,
    )  # fmt: skip
    cfg["vision_config"].update(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=128)
    cfg["audio_config"].update(hidden_size=512, num_hidden_layers=4, num_attention_heads=4)
    torch.manual_seed(0)
    config = Gemma4Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model = Gemma4ForConditionalGeneration(config)
    model.save_pretrained(out, max_shard_size="250MB")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_merge_"))
    base = build_base(work / "base")
    adapter = work / "adapter"
    if not adapter.exists():
        write_synthetic_adapter(base, adapter, r=64, name_style="plain")
    shards = sorted(base.glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    largest_shard = max(p.stat().st_size for p in shards)
    print(f"base: {mb(model_bytes)} in {len(shards)} shards (largest {mb(largest_shard)}); adapter {mb((adapter / 'adapter_model.safetensors').stat().st_size)}")
    ours, peft = [], []
    for i in range(args.rounds):
        for out in (work / "ours", work / "peft"):
            shutil.rmtree(out, ignore_errors=True)
        o = measure(
            "import torch, safetensors\nfrom gemma4_bridge.converters import merge_adapter",
            f"merge_adapter({str(adapter)!r}, {str(base)!r}, {str(work / 'ours')!r})",
        )
        p = measure(
            "import torch\nfrom peft import PeftModel\nfrom transformers import Gemma4ForConditionalGeneration",
            f"""
            model = Gemma4ForConditionalGeneration.from_pretrained({str(base)!r}, dtype=torch.float32)
            model = PeftModel.from_pretrained(model, {str(adapter)!r}).merge_and_unload()
            model.save_pretrained({str(work / 'peft')!r}, max_shard_size="250MB")
            """,
        )
        ours.append(o)
        peft.append(p)
        print(f"round {i + 1}: gemma4-bridge merge {o['seconds']:.1f} s / peak {mb(o['peak_rss'])} "
              f"(+{mb(o['peak_rss'] - o['base_rss'])}); PEFT {p['seconds']:.1f} s / peak {mb(p['peak_rss'])} "
              f"(+{mb(p['peak_rss'] - p['base_rss'])})")  # fmt: skip
    o_growth = max(r["peak_rss"] - r["base_rss"] for r in ours)
    p_growth = max(r["peak_rss"] - r["base_rss"] for r in peft)
    o_peak, p_peak = max(r["peak_rss"] for r in ours), max(r["peak_rss"] for r in peft)
    print(f"peak RSS ratio gemma4-bridge / PEFT merge_and_unload: {o_peak / p_peak:.2f} absolute, "
          f"{o_growth / p_growth:.3f} above post-import baselines [{mb(o_growth)} vs {mb(p_growth)}]")  # fmt: skip
    print(f"merge memory growth vs largest shard: {o_growth / largest_shard:.2f}x ({mb(o_growth)} vs {mb(largest_shard)}): "
          f"{'bounded by one shard' if o_growth <= largest_shard else 'NOT bounded by one shard'}; "
          f"vs model size {o_growth / model_bytes:.2f}x")  # fmt: skip
    print(f"time: gemma4-bridge {min(r['seconds'] for r in ours):.1f} s vs PEFT {min(r['seconds'] for r in peft):.1f} s")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
