"""Merge an adapter into the base weights, one tensor at a time, for servers without LoRA.

Each base shard is rewritten with :func:`write_streaming`: a tensor is read (mmap), gets
``scaling * B @ A`` added in float32 if the adapter targets it, is cast back to its own dtype
(bf16 stays bf16) and written; peak memory is one tensor plus one delta, whatever the model size.
Clippable tower sites get the delta on ``...linear.weight``, i.e. inside the clamp, exactly where
PEFT applies it. Config, tokenizer and processor files are copied; the shard index is rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma4_bridge.adapter_io import AdapterDir
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import Gemma4Layout, read_safetensors_header
from gemma4_bridge.output import atomic_output_dir, check_output

from .canonical import plan
from .plans import CanonicalPlan, ModuleDelta
from .experts import ExpertDelta, expert_delta
from .convert import progress_bar, refuse_overwriting_input
from .safetensors_stream import SafetensorsReader, TensorSpec, write_streaming

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class MergeResult:
    out: Path
    plan: CanonicalPlan
    merged_weights: int
    shards: int




def merge_adapter(
    adapter: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    zero3_checkpoint: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> MergeResult:
    """Write base + adapter as a full checkpoint in ``out``; raises :class:`BridgeError`, writing nothing, on bad input."""
    base_dir = Path(base)
    layout = Gemma4Layout.from_model_dir(base_dir)
    if layout.quantization:
        raise BridgeError(
            f"{base_dir}: a {layout.quantization}-quantized checkpoint; merge adds each delta to full-precision weights "
            "and writes them, which a quantized weight cannot take without being dequantized and requantized (rounding "
            "the delta away in part).",
            fix="merge into the unquantized checkpoint the quantized one was made from, then quantize the merged model if needed",
        )
    ad = AdapterDir.open(adapter)
    out_path = Path(out)
    refuse_overwriting_input([ad.path, base_dir], out_path)
    p = plan(ad.path, layout, zero3_checkpoint=zero3_checkpoint)
    p.raise_if_broken()
    check_output(out_path, force=force)
    deltas: dict[str, ModuleDelta | ExpertDelta] = {f"{m.site.checkpoint_path}.weight": m for m in p.modules}
    deltas.update({e.site.model_path: e for e in p.experts})  # 3-D expert parameters have no ".weight"
    shards = sorted(base_dir.glob("*.safetensors"))
    headers = {shard: read_safetensors_header(shard) for shard in shards}
    found = {name for h in headers.values() for name in h if name != "__metadata__"}
    missing = sorted(set(deltas) - found)
    if missing:
        raise BridgeError(
            f"{base_dir}: no tensor {missing[0]} in any shard, but the adapter targets it.",
            fix="pass --base with the complete checkpoint the adapter was trained on",
        )
    total = sum(len(h) - ("__metadata__" in h) for h in headers.values())
    merged = 0
    with atomic_output_dir(out_path, force=force) as tmp, progress_bar(total, "merge") as bar:
        for shard, header in headers.items():
            merged += _merge_shard(shard, header, tmp / shard.name, deltas, p, bar)
        _copy_side_files(base_dir, tmp, {s.name for s in shards})
        _rewrite_index(base_dir, tmp, headers)
    return MergeResult(out_path, p, merged, len(shards))


def _merge_shard(
    shard: Path, header: dict[str, Any], out: Path, deltas: dict[str, ModuleDelta | ExpertDelta], p: CanonicalPlan, bar: Any
) -> int:
    reader = SafetensorsReader(shard, header)
    count = 0

    def produce(spec: TensorSpec) -> Any:
        nonlocal count
        tensor = reader.get(spec.name)
        delta = deltas.get(spec.name)
        if delta is None:
            return tensor
        a, b = p.load(delta.a).float(), p.load(delta.b).float()
        count += 1
        if isinstance(delta, ExpertDelta):  # [E, out, in]: every expert's delta at once, as PEFT merges it
            return (tensor.float() + expert_delta(a, b, delta.site.num_experts, delta.scaling)).to(tensor.dtype)
        return (tensor.float() + delta.scaling * (b @ a)).to(tensor.dtype)

    metadata = dict(header.get("__metadata__") or {"format": "pt"})
    metadata["gemma4_bridge_merge"] = json.dumps({"adapter": p.source, "merged_tensors": sorted(n for n in deltas if n in header)})
    write_streaming(out, reader.specs(), produce, metadata, lambda _: bar.update(1))
    return count


def _copy_side_files(base_dir: Path, out: Path, shard_names: set[str]) -> None:
    """Config, generation config, tokenizer, processor, chat template: everything but weights and index.

    Contents only (``copyfile``): the copies get the umask's modes, like every other output file,
    not the base's (a read-only or 0600 base file would otherwise make the output unreadable to others).
    """
    for item in base_dir.iterdir():
        if item.name in shard_names or item.name == INDEX_NAME or item.name.startswith("."):
            continue
        if item.is_dir():
            (out / item.name).mkdir()
            _copy_side_files(item, out / item.name, set())
        else:
            shutil.copyfile(item, out / item.name)


def _rewrite_index(base_dir: Path, out: Path, headers: dict[Path, dict[str, Any]]) -> None:
    index_path = base_dir / INDEX_NAME
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    total = sum(info["data_offsets"][1] - info["data_offsets"][0] for h in headers.values() for k, info in h.items() if k != "__metadata__")
    index.setdefault("metadata", {})["total_size"] = total
    index["weight_map"] = {name: shard.name for shard, h in headers.items() for name in h if name != "__metadata__"}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
