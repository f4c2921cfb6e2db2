"""LoRA on Gemma 4's 3-D expert parameters: PEFT's layout, and exact conversions into it.

Gemma 4 MoE layers (26B-A4B) hold their experts as two 3-D parameters, not as linears:
``experts.gate_up_proj`` [E, 2*I, H] (gate rows first, then up) and ``experts.down_proj`` [E, H, I].
PEFT (``target_parameters=["experts.gate_up_proj", "experts.down_proj"]``) wraps each in a
``ParamWrapper`` and saves, per parameter, one pair of 2-D factors for *all* experts
(peft 0.21 ``lora/layer.py`` ``ParamWrapper.update_layer`` / ``get_delta_weight``):

    lora_A: [E*r, in]   rows expert-major:  A_e = lora_A[e*r:(e+1)*r]
    lora_B: [out, r*E]  columns rank-major: B_e = lora_B[:, e::E]  (reshape(out, r, E)[..., e])
    delta[e] = scaling * B_e @ A_e          [out, in] = [E, out, in] as the parameter stores it

with one ``scaling`` (alpha/r, or alpha/sqrt(r) with rsLoRA) per parameter, ``r`` the per-expert
rank. Both parameters of one ``experts`` module nest: the parameter registered first
(``gate_up_proj``) is wrapped first, so when both are targeted its keys are
``experts.base_layer.lora_*`` and ``down_proj``'s are ``experts.lora_*``; alone, either is
``experts.lora_*``. This PEFT form is the canonical one: PEFT loads it, the training wrapper
writes it, and it is the only form that stays one tensor pair per parameter at 128 experts.

Other exporters write one 2-D LoRA per expert and projection (``experts.N.gate_proj`` /
``up_proj`` / ``down_proj``, or fused ``experts.N.gate_up_proj``). Every such adapter has an
exact PEFT form: experts are stacked (zero factors for experts without LoRA), separate gate and up
LoRAs become one block-diagonal LoRA of rank r_gate + r_up on ``gate_up_proj``, and experts whose
rank is below the largest get zero rows/columns. Only where per-expert scalings differ is a factor
rescaled (``B_e * s_e / s``): one float rounding, reported as such.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

# The parameters of one ``Gemma4TextExperts`` in registration order (= PEFT's nesting order).
EXPERT_PARAMS: tuple[str, ...] = ("gate_up_proj", "down_proj")


def peft_nesting(param: str, targeted: Sequence[str]) -> str:
    """What PEFT puts between ``experts`` and ``.lora_A`` for ``param``, given which parameters of
    the same experts module the adapter targets: the last targeted (registration order) is outermost."""
    order = [p for p in EXPERT_PARAMS if p in targeted]
    return ".base_layer" * (len(order) - 1 - order.index(param))


def param_at_depth(depth: int, targeted: Sequence[str]) -> str | None:
    """Inverse of :func:`peft_nesting`: which parameter the keys ``depth`` ``.base_layer`` deep hold."""
    order = [p for p in EXPERT_PARAMS if p in targeted]
    index = len(order) - 1 - depth
    return order[index] if 0 <= index < len(order) else None


def split_peft(lora_a: Any, lora_b: Any, num_experts: int) -> tuple[Any, Any]:
    """PEFT's factors -> per-expert ``(A [E, r, in], B [E, out, r])``."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts).permute(2, 0, 1)
    return a, b


def join_peft(a: Any, b: Any) -> tuple[Any, Any]:
    """Per-expert ``(A [E, r, in], B [E, out, r])`` -> PEFT's ``(lora_A [E*r, in], lora_B [out, r*E])``."""
    num_experts, rank, in_features = a.shape
    lora_a = a.reshape(num_experts * rank, in_features).contiguous()
    lora_b = b.permute(1, 2, 0).reshape(b.shape[1], rank * num_experts).contiguous()
    return lora_a, lora_b


def expert_delta(lora_a: Any, lora_b: Any, num_experts: int, scaling: float) -> Any:
    """``[E, out, in]`` delta of a PEFT expert LoRA, in float32 (as :func:`merge` adds it)."""
    import torch

    a, b = split_peft(lora_a.float(), lora_b.float(), num_experts)
    return torch.bmm(b, a) * scaling


@dataclass(frozen=True)
class ExpertLora:
    """One 2-D LoRA of one expert: delta = scaling * b @ a (a [r, in], b [out, r])."""

    a: Any
    b: Any
    scaling: float


def fuse_gate_up(gate: ExpertLora | None, up: ExpertLora | None, intermediate: int, hidden: int) -> ExpertLora:
    """Separate gate/up LoRAs of one expert as one LoRA on its ``gate_up`` rows (gate first).

    Block-diagonal: A = [A_g; A_u], B = [[B_g, 0], [0, B_u]], rank r_g + r_u; a missing half is
    rank 0. The scaling is the gate's; the up half's B is rescaled if its scaling differs.
    """
    import torch

    parts = [p for p in (gate, up) if p is not None]
    scaling = parts[0].scaling
    dtype = parts[0].a.dtype
    ranks = [p.a.shape[0] if p is not None else 0 for p in (gate, up)]
    a = torch.zeros(sum(ranks), hidden, dtype=dtype)
    b = torch.zeros(2 * intermediate, sum(ranks), dtype=dtype)
    offset = 0
    for half, part in enumerate((gate, up)):
        if part is None:
            continue
        r = part.a.shape[0]
        a[offset : offset + r] = part.a
        b[half * intermediate : (half + 1) * intermediate, offset : offset + r] = _rescaled(part, scaling)
        offset += r
    return ExpertLora(a, b, scaling)


def stack_experts(per_expert: dict[int, ExpertLora], num_experts: int, in_features: int, out_features: int) -> tuple[Any, Any, int, float]:
    """Per-expert LoRAs (some experts may have none) -> PEFT's ``(lora_A, lora_B, r, scaling)``.

    r is the largest rank; lower-rank experts get zero rows/columns, experts without LoRA zero
    factors (exactly no delta). The scaling is the first expert's; others' B is rescaled to it.
    """
    import torch

    first = per_expert[min(per_expert)]
    scaling, dtype = first.scaling, first.a.dtype
    rank = max(p.a.shape[0] for p in per_expert.values())
    a = torch.zeros(num_experts, rank, in_features, dtype=dtype)
    b = torch.zeros(num_experts, out_features, rank, dtype=dtype)
    for e, part in per_expert.items():
        r = part.a.shape[0]
        a[e, :r] = part.a
        b[e, :, :r] = _rescaled(part, scaling)
    lora_a, lora_b = join_peft(a, b)
    return lora_a, lora_b, rank, scaling


def _rescaled(part: ExpertLora, scaling: float) -> Any:
    if part.scaling == scaling:
        return part.b
    return (part.b.double() * (part.scaling / scaling)).to(part.b.dtype)


# -- planning: expert keys of any form -> canonical (PEFT) tensors ------------------------------


# ``...experts`` / ``...experts.base_layer``: PEFT target_parameters. ``...experts.N.proj``: per expert.
_PEFT_FORM = re.compile(r"^(?P<experts>.+\.experts)(?P<nest>(?:\.base_layer)*)$")
_PER_EXPERT_FORM = re.compile(r"^(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|gate_up_proj)$")
# Per-expert projections -> the 3-D parameter that holds them.
_PROJ_PARAM = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "gate_up_proj": "gate_up_proj", "down_proj": "down_proj"}


def is_expert_module(module: str) -> bool:
    """Whether an adapter key's module path names Gemma 4 experts (any form)."""
    return bool(_PEFT_FORM.match(module) or _PER_EXPERT_FORM.match(module))


@dataclass(frozen=True)
class ExpertDelta:
    """One LoRA'd 3-D expert parameter of the canonical adapter (PEFT ``target_parameters`` form):
    delta[e] = scaling * B_e @ A_e, see :func:`split_peft`."""

    site: Any  # layout.ExpertSite
    a: Any  # PlannedTensor, [E*r, in]
    b: Any  # PlannedTensor, [out, r*E]
    rank: int  # per expert
    alpha: float
    scaling: float
    source_form: str  # "peft" or "per-expert"


class ExpertPlanner:
    """Collects an adapter's expert keys, then plans their canonical tensors.

    ``problem(code, severity, message, fix, tensors)`` and ``flavour(name)`` report into the
    caller's plan; ``rank_alpha(module, *canonical_names)`` is the caller's rank_pattern/alpha_pattern lookup and
    ``scaling(r, alpha)`` its scaling rule, so experts follow the same config semantics.
    """

    def __init__(
        self,
        config: dict[str, Any],
        layout: Any,
        label: str,
        problem: Callable[..., None],
        flavour: Callable[[str], None],
        rank_alpha: Callable[..., tuple[int, float]],
        scaling: Callable[[int, float], float],
        module_path: Callable[[str], str],
    ) -> None:
        self.config, self.layout, self.label = config, layout, label
        self.problem, self.flavour, self.rank_alpha, self.scaling, self.module_path = problem, flavour, rank_alpha, scaling, module_path
        self.peft: dict[str, dict[int, dict[str, tuple[str, tuple[int, ...], str]]]] = {}  # module -> depth -> part -> (key, shape, dtype)
        self.per_expert: dict[str, dict[tuple[int, str], dict[str, tuple[str, tuple[int, ...], str]]]] = {}
        self.source_modules: dict[str, str] = {}  # transformers experts module -> module as written
        # ZeRO-3 recovery (set by the caller before finish): canonical key -> checkpoint name / true shape.
        self.zero3_names: dict[str, str] = {}
        self.zero3_shapes: dict[str, tuple[int, ...]] = {}

    def take(self, parsed: Any, shape: tuple[int, ...], dtype: str) -> bool:
        """Collect ``parsed`` if it is an expert key; False if it is not one."""
        m = _PER_EXPERT_FORM.match(parsed.module) or _PEFT_FORM.match(parsed.module)
        if m is None:
            return False
        module = self.module_path(m.group("experts"))
        self.source_modules.setdefault(module, m.group("experts"))
        entry = (parsed.key, shape, dtype)
        if "expert" in m.groupdict():
            slot = self.per_expert.setdefault(module, {}).setdefault((int(m.group("expert")), m.group("proj")), {})
        else:
            slot = self.peft.setdefault(module, {}).setdefault(m.group("nest").count(".base_layer"), {})
        if parsed.part in slot:
            self.problem("duplicate", "broken", f"{self.label}: tensors {slot[parsed.part][0]} and {parsed.key} are the same expert LoRA factor.",
                         "save one adapter per directory (PEFT save_pretrained with selected_adapters)", (parsed.key,))  # fmt: skip
        slot[parsed.part] = entry
        return True

    def damaged_keys(self) -> list[str]:
        """Source keys of PEFT-form expert tensors with zero elements (saved under ZeRO-3 ungathered)."""
        return [key for key, shape in self.peft_keys() if 0 in shape]

    def peft_keys(self) -> list[tuple[str, tuple[int, ...]]]:
        """Source keys and shapes of every PEFT-form expert tensor: the form a ZeRO-3 checkpoint holds
        (per-expert 2-D LoRAs come from other exporters, never from a DeepSpeed run of this model)."""
        return [(key, shape) for depths in self.peft.values() for parts in depths.values() for key, shape, _ in parts.values()]

    def canonical_key(self, key: str) -> str | None:
        """The canonical key of a PEFT-form expert tensor named ``key`` (e.g. a DeepSpeed checkpoint
        parameter ``...experts.base_layer.lora_A.default.weight``); None if it is not one."""
        from gemma4_bridge.names import parse_key

        parsed = parse_key(key)
        m = _PEFT_FORM.match(parsed.module) if parsed is not None else None
        if m is None or self.layout is None:
            return None
        module = self.module_path(m.group("experts"))
        sites = {s.param: s for s in self.layout.experts_of(module)}
        if module not in self.peft or not sites:
            return None
        targeted = self._targeted(module, sites, sorted(self.peft[module]))
        param = param_at_depth(m.group("nest").count(".base_layer"), targeted)
        if param not in sites:
            return None
        return _key(sites[param].model_path.rsplit(".", 1)[0] + peft_nesting(param, targeted), parsed.part)

    def finish(self) -> tuple[list[Any], list[ExpertDelta]]:
        """Canonical tensors and deltas of every expert module collected."""
        tensors: list[Any] = []
        deltas: list[ExpertDelta] = []
        for module in sorted(set(self.peft) | set(self.per_expert)):
            if module in self.peft and module in self.per_expert:
                key = next(iter(next(iter(self.peft[module].values())).values()))[0]
                self.problem("mixed-expert-forms", "broken",
                             f"{self.label}: {self.source_modules[module]} has expert LoRA both as PEFT target_parameters "
                             f"(e.g. {key}) and per expert; one adapter holds one form.",
                             "save the adapter again from the training run", (key,))  # fmt: skip
                continue
            sites = self._sites(module)
            if sites is None:
                continue
            if module in self.peft:
                deltas += self._peft_module(module, sites)
            else:
                self.flavour("per-expert-lora")
                deltas += self._per_expert_module(module, sites)
        for d in deltas:
            tensors += [d.a, d.b]
        return tensors, deltas

    # -- one experts module ----------------------------------------------------------------
    def _sites(self, module: str) -> dict[str, Any] | None:
        from gemma4_bridge.layout import ExpertSite

        if self.layout is None:  # no base: shapes unchecked; sizes from the tensors later
            return {}
        sites = {s.param: s for s in self.layout.experts_of(module)}
        if not sites:
            any_key = self._any_key(module)
            self.problem(
                "unknown-module", "broken",
                f"{self.label}: tensor {any_key} is LoRA on MoE experts ({self.source_modules[module]}), but the base model "
                f"{self.layout.source} has no experts there; the adapter was trained for another Gemma 4 member (26B-A4B).",
                "pass --base with the Gemma 4 checkpoint the adapter was trained on", (any_key,),
            )  # fmt: skip
            return None
        assert all(isinstance(s, ExpertSite) for s in sites.values())
        return sites

    def _any_key(self, module: str) -> str:
        groups = self.peft.get(module) or self.per_expert.get(module) or {}
        return next(iter(next(iter(groups.values())).values()))[0]

    def _targeted(self, module: str, sites: dict[str, Any], depths: list[int]) -> list[str]:
        """Which parameters of ``module`` the PEFT adapter targets: as PEFT matches target_parameters
        (exact name or ``.``-suffix), else, for hand-made configs, as the nesting depths imply."""
        names = list(self.config.get("target_parameters") or [])
        targeted = [p for p in EXPERT_PARAMS if any(f"{module}.{p}" == n or f"{module}.{p}".endswith(f".{n}") for n in names)]
        source = self.source_modules[module]
        if not targeted:
            targeted = [p for p in EXPERT_PARAMS if any(f"{source}.{p}".endswith(f".{n}") or f"{source}.{p}" == n for n in names)]
        if not targeted and len(depths) == len(EXPERT_PARAMS):
            targeted = list(EXPERT_PARAMS)
        if not targeted and sites:
            # One parameter, no config to say which: the factor shapes decide (in/out differ).
            (part,) = self.peft[module].values()
            a_in = part["lora_A"][1][-1] if "lora_A" in part else None
            targeted = [p for p, s in sites.items() if a_in == s.in_features][:1]
        return targeted

    def _peft_module(self, module: str, sites: dict[str, Any]) -> list[ExpertDelta]:
        from .plans import PlannedTensor

        depths = sorted(self.peft[module])
        targeted = self._targeted(module, sites, depths)
        out: list[ExpertDelta] = []
        for depth in depths:
            parts = self.peft[module][depth]
            param = param_at_depth(depth, targeted)
            a, b = parts.get("lora_A"), parts.get("lora_B")
            if a is None or b is None:
                have = (a or b)[0]  # type: ignore[index]
                self.problem("unpaired", "broken", f"{self.label}: tensor {have} has no matching {'lora_B' if b is None else 'lora_A'}.",
                             "the adapter file is incomplete; save it again with PEFT", (have,))  # fmt: skip
                continue
            if param is None:
                self.problem("expert-nesting", "broken",
                             f"{self.label}: tensor {a[0]} is nested {depth} level(s) deep under {self.source_modules[module]}, but "
                             f"adapter_config.json target_parameters={self.config.get('target_parameters')} targets {len(targeted)} "
                             "parameter(s) there.", "restore the adapter_config.json saved with the adapter", (a[0],))  # fmt: skip
                continue
            site = sites.get(param)
            path = f"{module}.{param}"
            key_module = (site.model_path if site is not None else path).rsplit(".", 1)[0] + peft_nesting(param, targeted)
            keys = {part: _key(key_module, part) for part in ("lora_A", "lora_B")}
            recovered = {part: 0 in entry[1] and keys[part] in self.zero3_names for part, entry in (("lora_A", a), ("lora_B", b))}
            if any(0 in entry[1] and not recovered[part] for part, entry in (("lora_A", a), ("lora_B", b))):
                continue  # zero-element and not recoverable: reported as broken by the ZeRO-3 step
            a = (a[0], self.zero3_shapes[keys["lora_A"]], a[2]) if recovered["lora_A"] else a
            b = (b[0], self.zero3_shapes[keys["lora_B"]], b[2]) if recovered["lora_B"] else b
            r, alpha = self.rank_alpha(f"{self.source_modules[module]}.{param}", f"{module}.{param}")
            num_experts = site.num_experts if site is not None else max(1, a[1][0] // max(r, 1))
            problem = self._check_peft_shapes(path, site, a, b, r, num_experts)
            if problem:
                continue
            ta = PlannedTensor(keys["lora_A"], a[0], tuple(a[1]), a[2], from_zero3=recovered["lora_A"])
            tb = PlannedTensor(keys["lora_B"], b[0], tuple(b[1]), b[2], from_zero3=recovered["lora_B"])
            out.append(ExpertDelta(site or _bare_site(path, num_experts, a, b), ta, tb, r, alpha, self.scaling(r, alpha), "peft"))
        return out

    def _check_peft_shapes(self, path: str, site: Any, a: Any, b: Any, r: int, num_experts: int) -> bool:
        (ka, sa, _), (kb, sb, _) = a, b
        if len(sa) != 2 or len(sb) != 2 or sa[0] != r * num_experts or sb[1] != r * num_experts:
            self.problem(
                "rank-mismatch", "broken",
                f"{self.label}: expert tensors {ka} {list(sa)} / {kb} {list(sb)} do not hold rank r={r} for {num_experts} "
                "experts (PEFT target_parameters: lora_A [experts*r, in], lora_B [out, r*experts]).",
                "fix r / rank_pattern in adapter_config.json to match the tensors, or pass --base with the model it was trained on",
                (ka, kb),
            )  # fmt: skip
            return True
        if site is not None and (sa[1] != site.in_features or sb[0] != site.out_features):
            self.problem(
                "shape-mismatch", "broken",
                f"{self.label}: expert tensors {ka} {list(sa)} / {kb} {list(sb)} do not fit {path} "
                f"({site.num_experts} experts, {site.in_features} -> {site.out_features}) of the base {self.layout.source}: "
                "the adapter is for another model size.",
                "pass --base with the Gemma 4 checkpoint the adapter was trained on", (ka, kb),
            )  # fmt: skip
            return True
        return False

    def _per_expert_module(self, module: str, sites: dict[str, Any]) -> list[ExpertDelta]:
        """``experts.N.{gate,up,down,gate_up}_proj`` 2-D LoRAs -> one PEFT pair per 3-D parameter."""
        from .plans import PlannedTensor

        groups = self.per_expert[module]
        source = self.source_modules[module]
        out: list[ExpertDelta] = []
        for param in EXPERT_PARAMS:
            entries = {k: v for k, v in groups.items() if _PROJ_PARAM[k[1]] == param}
            if not entries:
                continue
            site = sites.get(param) if sites else None
            if self.layout is not None and site is None:
                continue  # reported by _sites
            for (e, proj), parts in sorted(entries.items()):
                if "lora_A" not in parts or "lora_B" not in parts:
                    have = next(iter(parts.values()))[0]
                    self.problem("unpaired", "broken", f"{self.label}: tensor {have} has no matching {'lora_B' if 'lora_B' not in parts else 'lora_A'}.",
                                 "the adapter file is incomplete; save it again", (have,))  # fmt: skip
                    return out
            experts = sorted({e for e, _ in entries})
            fused = {e for e, proj in entries if proj == "gate_up_proj"}
            split = {e for e, proj in entries if proj in ("gate_proj", "up_proj")}
            if fused & split:
                key = entries[(min(fused & split), "gate_up_proj")]["lora_A"][0]
                self.problem("mixed-expert-forms", "broken", f"{self.label}: expert {min(fused & split)} of {source} has LoRA on gate_up_proj "
                             "and on gate_proj/up_proj; one adapter holds one form.", "save the adapter again from the training run", (key,))  # fmt: skip
                return out
            num_experts = site.num_experts if site is not None else max(experts) + 1
            if experts[-1] >= num_experts:
                key = next(iter(entries[(experts[-1], next(p for e, p in entries if e == experts[-1]))].values()))[0]
                self.problem("shape-mismatch", "broken", f"{self.label}: tensor {key} is LoRA for expert {experts[-1]}, but "
                             f"{site.path if site else source} has {num_experts} experts: the adapter is for another model.",
                             "pass --base with the Gemma 4 checkpoint the adapter was trained on", (key,))  # fmt: skip
                return out
            # Per expert: (rank, scaling) of what becomes its slice, checked against the base shapes.
            plan_rows: dict[int, list[tuple[str, int, float, str, str]]] = {}
            for (e, proj), parts in sorted(entries.items()):
                (ka, sa, da), (kb, sb, _) = parts["lora_A"], parts["lora_B"]
                r_cfg, alpha = self.rank_alpha(f"{source}.{e}.{proj}")
                want_in = site.in_features if site is not None else sa[-1]
                want_out = (site.out_features // (2 if proj in ("gate_proj", "up_proj") else 1)) if site is not None else sb[0]
                if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1] or sa[0] != r_cfg:
                    self.problem("rank-mismatch", "broken", f"{self.label}: tensors {ka} {list(sa)} / {kb} {list(sb)} disagree with "
                                 f"each other or with r={r_cfg} in adapter_config.json.", "fix r / rank_pattern to match the tensors", (ka, kb))  # fmt: skip
                    return out
                if sa[1] != want_in or sb[0] != want_out:
                    self.problem("shape-mismatch", "broken", f"{self.label}: tensors {ka} {list(sa)} / {kb} {list(sb)} do not fit one "
                                 f"expert's {proj} ({want_in} -> {want_out}) of the base: the adapter is for another model size.",
                                 "pass --base with the Gemma 4 checkpoint the adapter was trained on", (ka, kb))  # fmt: skip
                    return out
                plan_rows.setdefault(e, []).append((proj, r_cfg, self.scaling(r_cfg, alpha), ka, kb))
            per_expert_rank = {e: sum(r for _, r, *_ in rows) for e, rows in plan_rows.items()}
            rank = max(per_expert_rank.values())
            scalings = {s for rows in plan_rows.values() for _, _, s, *_ in rows}
            scaling = plan_rows[experts[0]][0][2]
            if len(scalings) > 1:
                self.flavour("per-expert-scalings")
                self.problem("rescaled-experts", "note",
                             f"{self.label}: experts of {source} have different LoRA scalings {sorted(scalings)}; the canonical "
                             f"adapter keeps one scaling per parameter ({scaling:g}) and rescales lora_B of the others (one float rounding).")  # fmt: skip
            if site is None:
                continue  # no base: expert LoRA is recognised, but its canonical sizes need the base
            dtype = groups[next(iter(entries))]["lora_A"][2]
            recipe = _PerExpertRecipe(param, site.num_experts, site.in_features, site.out_features, tuple(
                (e, tuple((proj, s, ka, kb) for proj, _, s, ka, kb in rows)) for e, rows in sorted(plan_rows.items())
            ))  # fmt: skip
            targeted = [p for p in EXPERT_PARAMS if any(_PROJ_PARAM[proj] == p for _, proj in groups)]
            key_module = site.model_path.rsplit(".", 1)[0] + peft_nesting(param, targeted)
            source_keys = ",".join(ka for rows in plan_rows.values() for *_, ka, _ in rows)
            ta = PlannedTensor(_key(key_module, "lora_A"), source_keys, (site.num_experts * rank, site.in_features), dtype,
                               recipe=partial(recipe.build, part="lora_A"))  # fmt: skip
            tb = PlannedTensor(_key(key_module, "lora_B"), source_keys, (site.out_features, rank * site.num_experts), dtype,
                               recipe=partial(recipe.build, part="lora_B"))  # fmt: skip
            alpha_c = scaling * (rank**0.5 if self.config.get("use_rslora") else rank)
            out.append(ExpertDelta(site, ta, tb, rank, alpha_c, scaling, "per-expert"))
        return out


@dataclass(frozen=True)
class _PerExpertRecipe:
    """How one 3-D parameter's canonical factors are built from per-expert 2-D LoRAs."""

    param: str
    num_experts: int
    in_features: int
    out_features: int
    experts: tuple[tuple[int, tuple[tuple[str, float, str, str], ...]], ...]  # expert -> (proj, scaling, A key, B key)

    def build(self, get: Callable[[str], Any], *, part: str) -> Any:
        per: dict[int, ExpertLora] = {}
        for e, rows in self.experts:
            loras = {proj: ExpertLora(get(ka), get(kb), s) for proj, s, ka, kb in rows}
            if self.param == "gate_up_proj" and "gate_up_proj" not in loras:
                per[e] = fuse_gate_up(loras.get("gate_proj"), loras.get("up_proj"), self.out_features // 2, self.in_features)
            else:
                (per[e],) = loras.values()
        lora_a, lora_b, _, _ = stack_experts(per, self.num_experts, self.in_features, self.out_features)
        return lora_a if part == "lora_A" else lora_b


def _key(module: str, part: str) -> str:
    from gemma4_bridge.names import lora_key

    return lora_key(module, part)


def _bare_site(path: str, num_experts: int, a: Any, b: Any) -> Any:
    from gemma4_bridge.layout import ExpertSite

    return ExpertSite(path, num_experts, int(b[1][0]), int(a[1][1]))
