"""What the plugin does to an adapter before vLLM sees it: canonicalise in memory, then refuse or adapt.

Everything here is decided by :func:`gemma4_bridge.converters.plan` (the same code ``gemma4-bridge
convert`` runs) against the base model's :class:`~gemma4_bridge.layout.Gemma4Layout`; this module
only adds what is specific to vLLM 0.32:

* ``attention_k_eq_v`` layers: vLLM packs the k_proj weight into both the K and V slices of
  ``qkv_proj`` but applies a k_proj LoRA to the K slice only, while transformers takes V from the
  (LoRA-adapted) k_proj output. The k_proj factors are therefore also given to the V slice.
* tower / connector LoRA without ``--enable-tower-connector-lora`` would load and be ignored.
* LoRA on a linear that does not act on tokens (audio ``relative_k_proj``) cannot be batched by
  vLLM's per-token LoRA kernels: :mod:`.relative_position_lora` applies it per audio item, and it is
  refused only where that module does not fit the installed transformers / vLLM.
* ZeRO-3-damaged tensors are refused (serving never reads DeepSpeed pickles); ``convert``
  recovers them once, offline.

The refusals (all but the non-token one) are the plugin's :class:`~gemma4_bridge.servers.VLLMPlugin`
profile, the same code ``gemma4-bridge inspect`` predicts this server's verdict with.

Nothing is written anywhere: the user's adapter directory is only read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from gemma4_bridge.converters import CanonicalPlan, plan
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import COMPONENTS, Gemma4Layout
from gemma4_bridge.names import PEFT_PREFIX, lora_key
from gemma4_bridge.servers import VLLM_PLUGIN, expert_refusal, resolve_model_dir

from .upstream import detect_bug

logger = logging.getLogger("vllm.gemma4_bridge")
# Set on vLLM modules that must get no LoRA layer (MoE experts: expert LoRA is refused, servers.expert_refusal).
LORA_FREE_MARK = "_gemma4_bridge_lora_free"


@dataclass(frozen=True)
class ServingContext:
    """What the plugin knows about the served base model, in every process that needs it
    (the :class:`~gemma4_bridge.servers.ServerFlags` the plugin's profile checks against)."""

    layout: Gemma4Layout
    enable_tower_connector_lora: bool
    max_lora_rank: int | None = None
    # Tower/connector components vLLM builds no LoRA layers for because their modality is off
    # (--limit-mm-per-prompt '{"audio": 0}'), with the modality that disables them.
    disabled_towers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_vllm(cls, model_config: Any, lora_config: Any, towers_served: bool) -> ServingContext | None:
        """The one construction, for the front end and the workers: None without LoRA or a local checkpoint."""
        if lora_config is None:
            return None
        model_dir = resolve_model_dir(model_config.model)
        if model_dir is None:
            return None
        return cls(
            layout=Gemma4Layout.from_model_dir(model_dir),
            enable_tower_connector_lora=towers_served and bool(lora_config.enable_tower_connector_lora),
            max_lora_rank=lora_config.max_lora_rank,
            disabled_towers=disabled_towers(model_config),
        )


def disabled_towers(model_config: Any) -> tuple[tuple[str, str], ...]:
    """Towers/connectors whose every input modality is limited to 0 items: vLLM then wraps none of their linears for LoRA."""
    mm = getattr(model_config, "multimodal_config", None)
    if mm is None:
        return ()
    return tuple(
        (c.name, c.inputs[0]) for c in COMPONENTS if c.inputs and all(mm.get_limit_per_prompt(m) == 0 for m in c.inputs)
    )


@dataclass
class PreparedAdapter:
    """An adapter ready for ``LoRAModel.from_lora_tensors``: canonical names, vLLM-specific fixes."""

    config: dict[str, Any]
    tensors: dict[str, Any]
    plan: CanonicalPlan
    k_eq_v_copies: list[str] = field(default_factory=list)  # v_proj paths that received k_proj's factors


def check_adapter(adapter_dir: str | os.PathLike[str], ctx: ServingContext) -> CanonicalPlan:
    """Decide, from safetensors headers only, whether vLLM can serve ``adapter_dir`` as trained.

    The refusals are the plugin profile's (what ``inspect`` predicts), then the LoRA-on-non-token
    linears one. Raises :class:`BridgeError` naming the tensor and the fix; returns the plan otherwise.
    """
    p = plan(adapter_dir, ctx.layout, find_zero3=False)
    VLLM_PLUGIN.check(p, ctx)
    _check_non_token(p)
    return p


def check_values(p: CanonicalPlan) -> None:
    """Read every tensor once (one at a time) and refuse NaN/Inf, as the worker's load would.

    The front end runs this so that the worker never meets a bad value: there, any exception
    stops the engine (an offline ``LLM.generate`` hangs on its next call)."""
    p.check_values()  # in place, in the mapped file: no copy (760 MB: 0.15 s instead of 0.7 s)


def _check_non_token(p: CanonicalPlan) -> None:
    from . import relative_position_lora

    non_token = [m.site for m in p.modules if not m.site.token_wise and not relative_position_lora.serves(m.site)]
    if non_token:
        names = ", ".join(sorted(s.path for s in non_token))
        raise BridgeError(
            f"{p.weights_label}: LoRA on {names}: this linear acts on relative position embeddings, not on tokens, "
            "and vLLM's LoRA kernels apply deltas per token, so it cannot be served as trained "
            f"({'; '.join(relative_position_lora.verify_upstream()) or 'not an audio attention linear'}).",
            fix="merge the adapter into the base weights ('gemma4-bridge merge') and serve the merged model, or "
            "retrain with exclude_modules=['relative_k_proj']",
        )


def prepare_adapter(adapter_dir: str | os.PathLike[str], ctx: ServingContext, values_checked: bool = False) -> PreparedAdapter:
    """Canonical tensors (mmap) plus the vLLM fixes; logs what was dropped or added. Values are
    checked finite unless ``values_checked`` (a validated snapshot: the front end checked them)."""
    return adapt_plan(check_adapter(adapter_dir, ctx), check_finite=not values_checked)


def adapt_plan(p: CanonicalPlan, check_finite: bool = True) -> PreparedAdapter:
    """The plugin profile's ``adapt``: load the plan's tensors and give V slices k_proj's LoRA."""
    assert p.layout is not None, "the plugin always plans against the served base"
    refusal = expert_refusal(p)
    if refusal is not None:  # never hand vLLM a plan whose expert LoRA it would drop
        raise refusal.as_error()
    tensors: dict[str, Any] = {}
    config = dict(p.config)
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    copies: list[str] = []
    # vLLM 0.34 applies k_proj LoRA to V on k_eq_v layers itself; copying there would apply it twice.
    copy_k_to_v = bool(detect_bug("k_eq_v_v_lora").present)
    loaded = p.load_all(check_finite=check_finite)
    for module in p.modules:
        a, b = loaded[module.a.key], loaded[module.b.key]
        tensors[_serving_key(module.a.key, module.site)], tensors[_serving_key(module.b.key, module.site)] = a, b
        v_path = p.layout.v_path_fed_by(module.site) if copy_k_to_v else None
        if v_path is not None:
            # Copies, not aliases: vLLM scales lora_B in place per module (LoRALayerWeights.optimize),
            # so a shared tensor would be scaled twice (measured: K and V got 2x the delta).
            tensors[lora_key(v_path, "lora_A")] = a.clone()
            tensors[lora_key(v_path, "lora_B")] = b.clone()
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


def _serving_key(key: str, site: Any) -> str:
    """The key vLLM's weights mapper expects: vLLM names modules after the *checkpoint* (12B Unified
    keeps ``model.vision_embedder.patch_dense``), while canonical keys name transformers modules."""
    if site.checkpoint_path == site.model_path:
        return key
    return key.replace(f"{PEFT_PREFIX}{site.model_path}.", f"{PEFT_PREFIX}{site.checkpoint_path}.", 1)


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
    # vLLM names Unified's embedders after the checkpoint; every other module after transformers.
    stored = {m.site.path: m.site.checkpoint_path if m.site.checkpoint_path != m.site.model_path else m.site.path for m in p.modules}
    names = {path: vllm_module_name(name, rename, packed, wrapped) for path, name in stored.items()}
    missing = [(path, name) for path, name in names.items() if name not in wrapped]
    if missing:
        path, name = missing[0]
        raise BridgeError(
            f"{p.weights_label}: vLLM has no LoRA layer for {path} (vLLM module {name}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); it would load the tensors and ignore them.",
            fix="merge the adapter into the base ('gemma4-bridge merge') and serve the merged model, or retrain "
            "without those modules",
        )
