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

from gemma4_bridge.converters.canonical import ModuleDelta, plan
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import LANGUAGE_MODEL, Gemma4Layout, text_layer_path
from gemma4_bridge.names import lora_key

from .dims import PARENT, STACKED, slice_out_features, text_site

logger = logging.getLogger(__name__)

# The transformers linears whose LoRA SGLang applies, in the order SGLang stacks them.
SGLANG_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ZERO3_FIX = (
    "recover the real values first: gemma4-bridge convert ADAPTER_DIR OUT_DIR --base MODEL_DIR "
    "--zero3-checkpoint DEEPSPEED_CHECKPOINT_DIR, then serve OUT_DIR"
)


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
    import torch

    p = plan(adapter, layout, find_zero3=False)
    zero = [pr for pr in p.broken if pr.code == "zero-element"]
    if zero:
        raise BridgeError(
            f"{p.weights_label}: {len(zero[0].tensors)} tensor(s) have zero elements (e.g. {zero[0].tensors[0]}): the "
            "adapter was saved under DeepSpeed ZeRO-3 without gathering, and serving it would silently drop them.",
            fix=ZERO3_FIX,
        )
    p.raise_if_broken()
    _refuse_unservable(p.modules, p.weights_label)
    if not p.modules:
        raise BridgeError(f"{p.weights_label}: no LoRA tensors for the language model.", fix="check that this is the adapter you trained")

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
                if leaf == "v_proj" and text_layer.k_eq_v and text_layer.has_k_proj:
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
        lora_alpha=_int_if_whole(ref_scaling * rank),  # SGLang's scaling lora_alpha / r == the adapter's PEFT scaling
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
    )
    return SGLangAdapter(config, tensors, p.source, p.flavours, p.dropped, sorted(set(k_eq_v_layers)), folded)


def _refuse_unservable(modules: list[ModuleDelta], label: str) -> None:
    towers = [m for m in modules if m.site.component != LANGUAGE_MODEL]
    if towers:
        kinds = sorted({m.site.component for m in towers})
        raise BridgeError(
            f"{label}: {len(towers)} LoRA module(s) target {', '.join(kinds)} (e.g. {towers[0].a.source_key}); "
            "SGLang applies LoRA to the language model only, so they would be lost (or mis-applied to text layers).",
            fix="serve this adapter with vLLM and the gemma4-bridge plugin (it applies tower LoRA), or retrain with "
            r"target_modules limited to the language model, e.g. '.*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)'",
        )
    other = [m for m in modules if m.site.leaf not in SGLANG_TARGETS or m.site.text_layer is None]
    if other:
        names = sorted({m.site.leaf for m in other})
        raise BridgeError(
            f"{label}: {len(other)} LoRA module(s) target {', '.join(names)} (e.g. {other[0].a.source_key}); SGLang "
            f"applies Gemma 4 LoRA only to {', '.join(SGLANG_TARGETS)}, so they would be lost.",
            fix="serve this adapter with vLLM and the gemma4-bridge plugin, or retrain without those modules "
            "(PEFT 'all-linear' includes per_layer_input_gate / per_layer_projection)",
        )


def _adapter_scaling(config: Mapping[str, Any]) -> float:
    """The adapter-wide PEFT scaling (from ``r`` and ``lora_alpha``), the reference for folding."""
    from gemma4_bridge.converters.canonical import lora_scaling

    return lora_scaling(config, int(config.get("r", 8)), float(config.get("lora_alpha", 8)))


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


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
