"""What the plugin does to an adapter before vLLM sees it: canonicalise in memory, then refuse or adapt.

Everything here is decided by :func:`gemma4_bridge.converters.plan` (the same code ``gemma4-bridge
convert`` runs) against the base model's :class:`~gemma4_bridge.layout.Gemma4Layout`; this module
only adds what is specific to vLLM 0.32:

* ``attention_k_eq_v`` layers: vLLM packs the k_proj weight into both the K and V slices of
  ``qkv_proj`` but applies a k_proj LoRA to the K slice only, while transformers takes V from the
  (LoRA-adapted) k_proj output. The k_proj factors are therefore also given to the V slice.
* tower / connector LoRA without ``--enable-tower-connector-lora`` would load and be ignored.
* LoRA on a linear that does not act on tokens (audio ``relative_k_proj``) cannot be batched by
  vLLM's per-token LoRA kernels.
* ZeRO-3-damaged tensors are refused here (serving never reads DeepSpeed pickles); ``convert``
  recovers them once, offline.

Nothing is written anywhere: the user's adapter directory is only read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_bridge.converters import CanonicalPlan, plan
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import NON_LANGUAGE, Gemma4Layout
from gemma4_bridge.names import PEFT_PREFIX

logger = logging.getLogger("vllm.gemma4_bridge")

TOWER_FLAG = "--enable-tower-connector-lora"


@dataclass(frozen=True)
class ServingContext:
    """What the plugin knows about the served base model, in every process that needs it."""

    layout: Gemma4Layout
    enable_tower_connector_lora: bool
    max_lora_rank: int | None = None
    # Tower/connector components vLLM builds no LoRA layers for because their modality is off
    # (--limit-mm-per-prompt '{"audio": 0}'), with the modality that disables them.
    disabled_towers: tuple[tuple[str, str], ...] = ()


@dataclass
class PreparedAdapter:
    """An adapter ready for ``LoRAModel.from_lora_tensors``: canonical names, vLLM-specific fixes."""

    config: dict[str, Any]
    tensors: dict[str, Any]
    plan: CanonicalPlan
    k_eq_v_copies: list[str] = field(default_factory=list)  # v_proj paths that received k_proj's factors


def resolve_model_dir(model: str) -> Path | None:
    """The local directory of the served model (a path, or a hub id already in the local cache)."""
    if Path(model, "config.json").is_file():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(model, local_files_only=True, allow_patterns=["config.json", "*.safetensors*"])
    except Exception:
        return None
    return Path(local) if Path(local, "config.json").is_file() else None


def check_adapter(adapter_dir: str | os.PathLike[str], ctx: ServingContext) -> CanonicalPlan:
    """Decide, from safetensors headers only, whether vLLM can serve ``adapter_dir`` as trained.

    Raises :class:`BridgeError` naming the tensor and the fix; returns the plan otherwise.
    """
    p = plan(adapter_dir, ctx.layout, find_zero3=False)
    damaged = [prob for prob in p.broken if prob.code == "zero-element"]
    if damaged:
        prob = damaged[0]
        raise BridgeError(
            f"{p.weights_label}: {len(prob.tensors)} tensor(s) have zero elements (e.g. {prob.tensors[0]}): the "
            "adapter was saved under DeepSpeed ZeRO-3 without gathering, so serving it would apply no delta there.",
            fix=f"recover the values once with 'gemma4-bridge convert {p.source} OUT --zero3-checkpoint "
            "<DeepSpeed checkpoint dir>' and serve OUT",
        )
    p.raise_if_broken()
    _check_sites(p, ctx)
    if ctx.max_lora_rank is not None:
        too_big = [m for m in p.modules if m.rank > ctx.max_lora_rank]
        if too_big:
            raise BridgeError(
                f"{p.weights_label}: module {too_big[0].site.path} has LoRA rank {too_big[0].rank}, above the "
                f"server's max_lora_rank {ctx.max_lora_rank}.",
                fix=f"restart vLLM with --max-lora-rank {max(m.rank for m in p.modules)} (or higher)",
            )
    return p


def check_values(p: CanonicalPlan) -> None:
    """Read every tensor once (one at a time) and refuse NaN/Inf, as the worker's load would.

    The front end runs this so that the worker never meets a bad value: there, any exception
    stops the engine (an offline ``LLM.generate`` hangs on its next call)."""
    try:
        for entry in p.tensors:
            p.load(entry)
    finally:
        p.close()


def _check_sites(p: CanonicalPlan, ctx: ServingContext) -> None:
    non_token = [m.site for m in p.modules if not m.site.token_wise]
    if non_token:
        names = ", ".join(sorted(s.path for s in non_token))
        raise BridgeError(
            f"{p.weights_label}: LoRA on {names}: this linear acts on relative position embeddings, not on tokens, "
            "and vLLM's LoRA kernels apply deltas per token, so it cannot be served as trained.",
            fix="merge the adapter into the base weights ('gemma4-bridge merge') and serve the merged model, or "
            "retrain with exclude_modules=['relative_k_proj']",
        )
    towers = [m.site for m in p.modules if m.site.component in NON_LANGUAGE]
    for component, modality in ctx.disabled_towers:
        off = [s for s in towers if s.component == component]
        if off and ctx.enable_tower_connector_lora:
            raise BridgeError(
                f"{p.weights_label}: {len(off)} LoRA module(s) target {component} (e.g. {off[0].path}), but the server "
                f"runs with {modality} inputs disabled (--limit-mm-per-prompt {modality}=0), so vLLM built no LoRA layers "
                "there and would ignore them.",
                fix=f"allow {modality} inputs (e.g. --limit-mm-per-prompt '{{\"{modality}\": 1}}') or serve an adapter without {component} LoRA",
            )
    if towers and not ctx.enable_tower_connector_lora:
        raise BridgeError(
            f"{p.weights_label}: {len(towers)} LoRA module(s) target the vision/audio towers or their connectors "
            f"(e.g. {towers[0].path}); vLLM started without {TOWER_FLAG} would load them and silently ignore them.",
            fix=f"restart vLLM with {TOWER_FLAG} (LLM(..., enable_tower_connector_lora=True))",
        )


def prepare_adapter(adapter_dir: str | os.PathLike[str], ctx: ServingContext) -> PreparedAdapter:
    """Canonical tensors (values read once, mmap) plus the vLLM fixes; logs what was dropped or added."""
    p = check_adapter(adapter_dir, ctx)
    tensors: dict[str, Any] = {}
    config = dict(p.config)
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    copies: list[str] = []
    k_eq_v = set(ctx.layout.k_eq_v_layers)
    for module in p.modules:
        a, b = p.load(module.a), p.load(module.b)
        tensors[module.a.key], tensors[module.b.key] = a, b
        if module.site.text_layer in k_eq_v and module.site.path.endswith(".self_attn.k_proj"):
            v_path = module.site.model_path.removesuffix("k_proj") + "v_proj"
            # Copies, not aliases: vLLM scales lora_B in place per module (LoRALayerWeights.optimize),
            # so a shared tensor would be scaled twice (measured: K and V got 2x the delta).
            tensors[f"{PEFT_PREFIX}{v_path}.lora_A.weight"] = a.clone()
            tensors[f"{PEFT_PREFIX}{v_path}.lora_B.weight"] = b.clone()
            for pattern, value in ((rank_pattern, module.rank), (alpha_pattern, module.alpha)):
                if module.site.model_path in pattern:
                    pattern[v_path] = value
            copies.append(v_path)
    config["rank_pattern"], config["alpha_pattern"] = rank_pattern, alpha_pattern
    kv_dropped = [k for k, why in p.dropped]
    if kv_dropped:
        logger.warning(
            "gemma4-bridge: %s: dropped %d k_proj/v_proj LoRA tensor(s) of KV-shared / k_eq_v layers, which those "
            "layers do not have (trained on transformers 5.5.0/5.5.1; they never affected the model), e.g. %s",
            p.source,
            len(kv_dropped),
            kv_dropped[0],
        )
    if p.flavours != ["canonical"]:
        logger.info("gemma4-bridge: %s: flavour(s) %s canonicalised in memory", p.source, ", ".join(p.flavours))
    if copies:
        logger.info(
            "gemma4-bridge: %s: k_proj LoRA also applied to V on attention_k_eq_v layer(s) (%s), as transformers does",
            p.source,
            ", ".join(copies),
        )
    return PreparedAdapter(config, tensors, p, copies)


def vllm_module_name(path: str, rename: Any, packed: dict[str, list[str]], wrapped: set[str]) -> str:
    """The vLLM module that must carry the LoRA of ``path`` (transformers naming), via vLLM's own
    rename mapper; a packed module (``qkv_proj``) where vLLM packs, the plain one where it does not
    (KV-shared layers keep a lone ``q_proj``)."""
    mapped = rename._map_name(path) or path
    if mapped in wrapped:
        return mapped
    parent, _, leaf = mapped.rpartition(".")
    for name, subs in packed.items():
        if leaf in subs:
            return f"{parent}.{name}"
    return mapped


def check_modules_wrapped(p: CanonicalPlan, wrapped: set[str], rename: Any, packed: dict[str, list[str]]) -> None:
    """Refuse an adapter whose modules vLLM built no LoRA layer for (it would ignore them silently)."""
    names = {m.site.path: vllm_module_name(m.site.path, rename, packed, wrapped) for m in p.modules}
    missing = [(path, name) for path, name in names.items() if name not in wrapped]
    if missing:
        path, name = missing[0]
        raise BridgeError(
            f"{p.weights_label}: vLLM has no LoRA layer for {path} (vLLM module {name}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); it would load the tensors and ignore them.",
            fix="merge the adapter into the base ('gemma4-bridge merge') and serve the merged model, or retrain "
            "without those modules",
        )
