"""Turn any Gemma 4 adapter into what SGLang's LoRA loader serves exactly, in memory.

The canonical plan (``gemma4_bridge.converters.canonical``) decides names, drops and refusals
the same way for every tool. This module adds what SGLang's loader needs on top:

* SGLang stacks q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` and reads all three
  (two) unconditionally: every layer that has one gets all of them, zero-filled where the
  adapter has none (a zero delta). KV-shared layers get zero K/V (they have no k_proj/v_proj).
* ``attention_k_eq_v`` layers compute V from k_proj in transformers, so the k_proj delta changes
  V too; SGLang keeps a separate V slice (a copy of the k_proj weight), which gets a copy of the
  k_proj LoRA.
* SGLang applies one scaling ``lora_alpha / r`` per adapter and ignores ``use_rslora``,
  ``rank_pattern`` and ``alpha_pattern``: ranks are zero-padded to the largest, and each module's
  true PEFT scaling is folded into its lora_B relative to the adapter's.
* SGLang applies LoRA to the language model's attention and MLP only: tower, connector and
  per-layer-input LoRA is refused by name (SGLang would mis-bucket tower tensors into text layers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gemma4_bridge.converters.canonical import plan
from gemma4_bridge.converters.peft_config import int_if_whole, lora_scaling
from gemma4_bridge.converters.plans import CanonicalPlan, ModuleDelta
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import Gemma4Layout, text_layer_path
from gemma4_bridge.names import lora_key
from gemma4_bridge.servers import SGLANG_CLASS, SGLANG_TARGETS, expert_refusal

from .dims import PARENT, STACKED, slice_out_features, text_site

logger = logging.getLogger(__name__)


@dataclass
class SGLangAdapter:
    """An adapter as SGLang's ``_load_lora_adapter_from_tensors`` takes it, and what was done to it."""

    config: dict[str, Any]
    tensors: dict[str, Any]
    source: str
    flavours: list[str]
    dropped: list[tuple[str, str]]  # (source tensor, why): KV-shared / k_eq_v extras
    k_eq_v_layers: list[int]  # layers whose V slice got the k_proj LoRA
    folded_scaling: int  # modules whose scaling differs from the adapter's, folded into lora_B

    def summary(self) -> str:
        parts = [f"flavours {', '.join(self.flavours)}", f"target_modules {self.config['target_modules']}"]
        if self.dropped:
            layers = sorted({int(k.split("layers.")[1].split(".")[0]) for k, _ in self.dropped if "layers." in k})
            parts.append(f"dropped {len(self.dropped)} k/v LoRA tensor(s) on KV-shared/k_eq_v layers {layers} (no effect in Gemma 4)")
        if self.k_eq_v_layers:
            parts.append(f"V gets the k_proj LoRA on k_eq_v layers {self.k_eq_v_layers} (as transformers computes it)")
        if self.folded_scaling:
            parts.append(f"per-module scaling (rsLoRA/rank_pattern/alpha_pattern) folded into lora_B for {self.folded_scaling} module(s)")
        return "; ".join(parts)


def prepare_adapter(
    adapter: str | os.PathLike[str] | tuple[Mapping[str, Any], Mapping[str, Any]],
    layout: Gemma4Layout,
) -> SGLangAdapter:
    """Normalise an adapter directory (or in-memory ``(config, tensors)``) for SGLang, or raise BridgeError."""
    p = plan(adapter, layout, find_zero3=False)
    SGLANG_CLASS.check(p)
    return adapt_plan(p)


def adapt_plan(p: CanonicalPlan) -> SGLangAdapter:
    """The SGLang class profile's ``adapt``: stack, zero-fill, copy k_proj to V on k_eq_v layers, fold scaling."""
    import torch

    layout = p.layout
    assert layout is not None, "the SGLang class always plans against the served base"
    refusal = expert_refusal(p, "SGLang")
    if refusal is not None:  # never hand SGLang a plan whose expert LoRA it would drop
        raise refusal.as_error()
    rank = max(m.rank for m in p.modules)
    dtype = getattr(torch, p.modules[0].a.dtype)
    ref_scaling = _adapter_scaling(p.source_config)
    by_layer: dict[int, dict[str, ModuleDelta]] = {}
    for m in p.modules:
        assert m.site.text_layer is not None
        by_layer.setdefault(m.site.text_layer, {})[m.site.leaf] = m

    tensors: dict[str, Any] = {}
    k_eq_v_layers: list[int] = []
    folded = 0
    targets: set[str] = set()
    for layer, modules in sorted(by_layer.items()):
        groups = [g for g in (*STACKED.values(), ("o_proj",), ("down_proj",)) if any(leaf in modules for leaf in g)]
        text_layer = layout.text_layers[layer]
        for group in groups:
            for leaf in group:
                module = modules.get(leaf)
                source = module
                if leaf == "v_proj" and text_layer.v_is_k_proj:
                    source = modules.get("k_proj")  # V is the k_proj output: same delta
                    if source is not None:
                        k_eq_v_layers.append(layer)
                if source is None:
                    a = torch.zeros(rank, _in_features(layout, layer, leaf), dtype=dtype)
                    b = torch.zeros(slice_out_features(layout, layer, leaf), rank, dtype=dtype)
                else:
                    a, b = p.load(source.a), p.load(source.b)
                    ratio = source.scaling / ref_scaling
                    if ratio != 1.0:
                        b = (b.float() * ratio).to(b.dtype)
                        folded += source is module
                    a, b = _pad_rank(a.to(dtype), b.to(dtype), rank)
                path = text_layer_path(layer, f"{PARENT[leaf]}.{leaf}")
                tensors[lora_key(path, "lora_A")] = a
                tensors[lora_key(path, "lora_B")] = b
                targets.add(leaf)

    config = dict(p.source_config)
    config.update(
        target_modules=[t for t in SGLANG_TARGETS if t in targets],
        r=rank,
        lora_alpha=int_if_whole(ref_scaling * rank),  # SGLang's scaling lora_alpha / r == the adapter's PEFT scaling
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
    )
    return SGLangAdapter(config, tensors, p.source, p.flavours, p.dropped, sorted(set(k_eq_v_layers)), folded)


def _adapter_scaling(config: Mapping[str, Any]) -> float:
    """The adapter-wide PEFT scaling (from ``r`` and ``lora_alpha``), the reference for folding."""
    return lora_scaling(config, int(config.get("r", 8)), float(config.get("lora_alpha", 8)))


def _in_features(layout: Gemma4Layout, layer: int, leaf: str) -> int:
    if leaf in ("k_proj", "v_proj"):
        leaf = "q_proj"  # K/V read the same hidden states as Q (their own linears may not exist)
    site = text_site(layout, layer, leaf)
    if site is None:
        raise BridgeError(f"{layout.source}: text layer {layer} has no {leaf}.", fix="re-download the base model")
    return site.in_features


def _pad_rank(a: Any, b: Any, rank: int) -> tuple[Any, Any]:
    """Zero-pad lora_A rows and lora_B columns to ``rank``: B @ A is unchanged."""
    import torch

    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
