"""Canonical adapter tensor names: every PEFT naming variant of a Gemma 4 LoRA key, mapped to one.

Canonical key: ``base_model.model.<module path>.<lora part>.weight`` where the module path is the
``nn.Linear`` that really receives the delta in the transformers model (tower keys end in
``...q_proj.linear``). The variants are a declarative table, in the spirit of gguf-py's
``tensor_mapping.py``: one row per way that real adapters spell a module path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gemma4_bridge.layout import COMPONENTS, Gemma4Layout, LinearSite, Reason

PEFT_PREFIX = "base_model.model."
LORA_PARTS: tuple[str, ...] = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _module_path_variants() -> tuple[tuple[str, re.Pattern[str], str], ...]:
    """The naming rows, derived from the component table (a new component is named everywhere)."""
    prefixes = "|".join(re.escape(c.prefix) for c in COMPONENTS)
    return (
        ("transformers", re.compile(rf"^((?:{prefixes}).*)$"), ""),
        *(
            ("vllm", re.compile(rf"^{re.escape(c.vllm_prefix)}(.*)$"), c.prefix)
            for c in COMPONENTS
        ),
        # Gemma4ForCausalLM: the decoder layers and the per-layer-input projection sit right under ``model``.
        *(
            ("causal-lm", re.compile(rf"^{re.escape(c.text_only_prefix)}(layers\..*|per_layer_model_projection)$"), c.prefix)
            for c in COMPONENTS
            if c.text_only_prefix
        ),
        *(
            ("bare", re.compile(rf"^{c.name}\.(layers\..*|encoder\..*)$"), c.prefix)
            for c in COMPONENTS
            if c.kind in ("language_model", "tower")
        ),
    )


# (flavour, pattern on the module path after the PEFT prefix is removed, prefix): the transformers
# path is the prefix + the pattern's group 1. First match wins; the result is then resolved against
# the layout (``.linear`` added for towers).
MODULE_PATH_VARIANTS: tuple[tuple[str, re.Pattern[str], str], ...] = _module_path_variants()
_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>" + "|".join(LORA_PARTS) + r")(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?(?:\.(?P<kind>weight|bias))?$"
)


@dataclass(frozen=True)
class ParsedKey:
    """One adapter tensor key split into what it means."""

    key: str
    module: str  # module path as written (PEFT prefix removed)
    part: str  # lora_A, lora_B, ...
    kind: str  # "weight" or "bias"
    adapter_name: str | None  # e.g. "default" in hand-saved ``...lora_A.default.weight``
    had_peft_prefix: bool


@dataclass(frozen=True)
class Resolution:
    """Where a key's delta lands in the base model, or why it lands nowhere."""

    parsed: ParsedKey
    site: LinearSite | None
    canonical_key: str | None
    variant: str  # which row of MODULE_PATH_VARIANTS matched ("unknown" if none)
    added_linear: bool  # tower key written without ``.linear`` (custom clippable LoRA layer)
    reason: Reason | None  # set when site is None


def parse_key(key: str) -> ParsedKey | None:
    """Split an adapter key; None for keys that are not LoRA tensors (e.g. modules_to_save weights)."""
    had_prefix = key.startswith(PEFT_PREFIX)
    body = key.removeprefix(PEFT_PREFIX)
    m = _KEY.match(body)
    if not m:
        return None
    adapter = m.group("adapter")
    kind = m.group("kind") or "weight"
    if adapter in ("weight", "bias") and m.group("kind") is None:
        adapter, kind = None, adapter
    return ParsedKey(key, m.group("module"), m.group("part"), kind, adapter, had_prefix)


def canonical_module_path(module: str) -> tuple[str, str]:
    """Map a module path in any known naming to transformers naming; returns (path, variant)."""
    for variant, pattern, prefix in MODULE_PATH_VARIANTS:
        m = pattern.match(module)
        if m:  # what pattern.sub(prefix + r"\1", module) returns, without a template per call
            return prefix + m.group(1) + module[m.end() :], variant
    return module, "unknown"


def lora_key(module_path: str, part: str, kind: str = "weight") -> str:
    """The one builder of a LoRA tensor key: ``base_model.model.<module path>.<part>.<kind>``."""
    return f"{PEFT_PREFIX}{module_path}.{part}.{kind}"


def canonical_key(site: LinearSite, part: str, kind: str = "weight") -> str:
    """The key of ``site``'s LoRA tensor as PEFT writes it for the base's own model class."""
    return lora_key(site.model_path, part, kind)


def resolve_key(key: str, layout: Gemma4Layout) -> Resolution | None:
    """Resolve one adapter key against the base layout; None if it is not a LoRA tensor."""
    parsed = parse_key(key)
    return None if parsed is None else resolve_parsed(parsed, layout)


def resolve_parsed(parsed: ParsedKey, layout: Gemma4Layout) -> Resolution:
    """:func:`resolve_key` for a key already parsed (the planner parses each key once)."""
    path, variant = canonical_module_path(parsed.module)
    site = layout.site(path)
    added_linear = False
    if site is None and not path.endswith(".linear"):
        wrapped = layout.site(f"{path}.linear")
        if wrapped is not None and wrapped.clippable:
            site, added_linear = wrapped, True
    if site is None:
        return Resolution(parsed, None, None, variant, False, layout.missing_site_reason(path))
    return Resolution(parsed, site, canonical_key(site, parsed.part, parsed.kind), variant, added_linear, None)
