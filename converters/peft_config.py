"""PEFT's LoRA config semantics, in one place: rank/alpha per module, scaling, the canonical config.

Matching follows PEFT itself (``peft.utils.other.get_pattern_key``, used when PEFT builds the
layers): a ``rank_pattern``/``alpha_pattern`` key is a regex that must match a dotted suffix of the
module name, and the first matching key in the dict's order wins. The planner and the training
wrapper both match through :func:`pattern_key`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .experts import ExpertDelta
    from .plans import ModuleDelta

# Config fields that only select modules; the canonical config lists modules explicitly instead.
SELECTION_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters")


# LoRA variants whose delta is not scaling * B @ A on every token of the named base, by the
# adapter_config.json field that turns each on: (problem code, what it changes). Each is refused by
# name, never served or merged as plain LoRA. VeLoRA is absent: it swaps in a backward pass only.
LORA_VARIANTS: dict[str, tuple[str, str]] = {
    "alora_invocation_tokens": ("alora", "Activated LoRA applies the delta only from the invocation tokens on, not to the whole sequence"),
    "layer_replication": ("layer-replication", "layer_replication stacks copies of base layers into a deeper model than the base"),
    "use_qalora": ("qalora", "QA-LoRA feeds lora_A group-pooled inputs of a quantized base"),
    "use_bdlora": ("bdlora", "BD-LoRA uses block-diagonal factors that PEFT expands per tensor-parallel shard"),
    "arrow_config": ("arrow", "Arrow routes each token among several adapters"),
    "monteclora_config": ("monteclora", "MonteCLoRA keeps a learned distribution over lora_A, with tensors beyond A and B"),
    "kasa_config": ("kasa", "KaSA truncates the base weight's singular values and adds a learned diagonal"),
}
# init_lora_weights values (prefixes: "pissa_niter_4") under which PEFT subtracts the initial
# B0 @ A0 from the base weights before training: the trained delta belongs to that residual base.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def variant_fields(config: Mapping[str, Any]) -> list[str]:
    """The :data:`LORA_VARIANTS` fields ``config`` turns on."""
    return [name for name in LORA_VARIANTS if config.get(name) not in (None, False, [], {})]


def base_modifying_init(config: Mapping[str, Any]) -> str | None:
    """``init_lora_weights`` when it names an init that modified the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA)."""
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        return init
    return None


def pattern_key(keys: Iterable[str], module: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key that applies to ``module``, as PEFT picks it; None if none."""
    return next((key for key in keys if re.match(rf"(.*\.)?({key})$", module)), None)


def effective_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, alpha) PEFT uses for ``module``."""
    return RankAlphaLookup(config)(module)


PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")


class RankAlphaLookup:
    """(r, alpha) per module as PEFT picks them, remembering which pattern keys applied where.

    A key is matched against the module as the adapter's tensors name it (PEFT's rule). Only when no
    key of a field applies there is it matched against the module's canonical names (``aliases``):
    a key written in the canonical layout while the tensors were renamed after training (say tower
    keys saved without ``.linear``) still names that module, and dropping it would change the
    scaling silently. Such uses are listed in :attr:`by_alias`, keys that apply nowhere by
    :meth:`unused` (PEFT ignores those, with a warning), so the planner can say both.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.defaults = {"rank_pattern": int(config.get("r", 8)), "alpha_pattern": float(config.get("lora_alpha", 8))}
        self.patterns: dict[str, Mapping[str, Any]] = {f: config.get(f) or {} for f in PATTERN_FIELDS}
        self.used: set[tuple[str, str]] = set()
        # (field, key) -> (the canonical name it matched, the module as written), first use of each key
        self.by_alias: dict[tuple[str, str], tuple[str, str]] = {}

    def __call__(self, module: str, *aliases: str) -> tuple[int, float]:
        values: list[Any] = []
        for field in PATTERN_FIELDS:
            pattern = self.patterns[field]
            key = pattern_key(pattern, module)
            if key is None:
                for alias in aliases:
                    key = pattern_key(pattern, alias)
                    if key is not None:
                        self.by_alias.setdefault((field, key), (alias, module))
                        break
            if key is not None:
                self.used.add((field, key))
            values.append(pattern[key] if key is not None else self.defaults[field])
        return int(values[0]), float(values[1])

    def unused(self) -> list[tuple[str, str]]:
        return [(f, k) for f in PATTERN_FIELDS for k in self.patterns[f] if (f, k) not in self.used]


def lora_scaling(config: Mapping[str, Any], r: int, alpha: float) -> float:
    """PEFT's scaling of a module's B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (r**0.5) if config.get("use_rslora") else alpha / r


def int_if_whole(x: float) -> int | float:
    """8.0 -> 8 in written configs (as PEFT writes them); 0.5 stays."""
    return int(x) if float(x).is_integer() else x


def canonical_config(source: Mapping[str, Any], modules: list[ModuleDelta], experts: list[ExpertDelta] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """The canonical adapter_config.json: explicit module (and expert parameter) lists, per-module
    rank/alpha where they differ."""
    config = {k: v for k, v in source.items() if k not in SELECTION_FIELDS}
    r, alpha = int(source.get("r", 8)), float(source.get("lora_alpha", 8))
    config["target_modules"] = sorted(m.site.model_path for m in modules)
    # Expert parameters by full path: PEFT matches target_parameters and rank/alpha patterns
    # against "<module>.<parameter>".
    sites = sorted([*modules, *experts], key=lambda m: m.site.path)
    config["rank_pattern"] = {m.site.model_path: m.rank for m in sites if m.rank != r}
    config["alpha_pattern"] = {m.site.model_path: int_if_whole(m.alpha) for m in sites if m.alpha != alpha}
    if experts:
        config["target_parameters"] = sorted(e.site.model_path for e in experts)
        config["lora_dropout"] = 0.0  # PEFT's ParamWrapper refuses dropout (it cannot be factored out)
    config["modules_to_save"] = None
    config["peft_type"] = "LORA"
    config.setdefault("bias", "none")
    config.setdefault("use_rslora", False)
    config.setdefault("lora_alpha", int_if_whole(alpha))
    return config
