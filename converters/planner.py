"""The planner's steps: config checks, key resolution, ZeRO-3 recovery, A/B pairing, classification.

One :class:`Planner` per :func:`~.canonical.plan` call; it collects :class:`~.plans.Problem` s
instead of raising, and returns a :class:`~.plans.CanonicalPlan`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import (
    COMPONENT_BY_NAME, LANGUAGE_MODEL, SAVED_EMBEDDING_TABLE, TIED_OUTPUT, Absence, Gemma4Layout, LinearSite, is_tied_output,
)  # fmt: skip
from gemma4_bridge.names import PEFT_PREFIX, ParsedKey, Resolution, canonical_module_path, lora_key, parse_key, resolve_parsed

from .experts import ExpertPlanner
from .peft_config import LORA_VARIANTS, RankAlphaLookup, base_modifying_init, canonical_config, lora_scaling, variant_fields
from .plans import CanonicalPlan, ModuleDelta, PlannedTensor, Problem, Severity
from .sources import TensorSource

if TYPE_CHECKING:
    from .zero3 import Zero3Checkpoint


TIED_OUTPUT_FIX = (
    f"retrain without {TIED_OUTPUT} or embed_tokens in target_modules (PEFT's 'all-linear' leaves both out), or serve "
    "the adapter with PEFT itself"
)

TRAINABLE_TOKENS_TENSOR = ".trainable_tokens_delta"  # PEFT's TrainableTokensLayer (trainable_token_indices)
TRAINABLE_TOKENS_WHAT = (
    "PEFT trains those rows of the embedding table (shared with the tied lm_head) as whole new values, "
    "which are not LoRA factors; vLLM and SGLang cannot load them."
)
TRAINABLE_TOKENS_FIX = (
    "merge the adapter with PEFT's merge_and_unload (it writes the trained rows into the embedding table) and serve "
    "the merged model, or retrain without trainable_token_indices"
)


def config_problems(c: Mapping[str, Any], where: str) -> list[Problem]:
    """What an adapter_config.json (or a LoraConfig's dict, ``where`` naming it) says is wrong before any
    tensor is read: trained parts that are not LoRA, and variants whose delta is not scaling * B @ A."""
    out: list[Problem] = []
    if c.get("modules_to_save"):
        out.append(Problem(
            "modules-to-save", "broken",
            f"{where}: modules_to_save={c['modules_to_save']} holds fully trained modules, which vLLM and SGLang "
            "cannot load as LoRA (vLLM refuses the adapter).",
            "retrain without modules_to_save, or serve the merged model from 'gemma4-bridge merge' after "
            "merging those modules with PEFT's merge_and_unload",
        ))  # fmt: skip
    if c.get("use_dora"):
        out.append(Problem(
            "dora", "broken", f"{where}: use_dora=true; DoRA's delta is not scaling * B @ A and no server here loads it.",
            "merge it with PEFT's merge_and_unload and serve the merged model, or retrain with plain LoRA",
        ))  # fmt: skip
    init = base_modifying_init(c)
    if init is not None:
        out.append(Problem(
            "base-modifying-init", "broken",
            f"{where}: init_lora_weights={init!r}: PEFT subtracts the initial B @ A from the base weights before "
            "training, so the trained delta belongs to that residual base, not to the base the adapter names; "
            "served or merged onto the original weights it gives other numbers.",
            "convert it to a plain LoRA of the original base with PEFT: load it with PeftModel.from_pretrained and "
            "save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter saved at init; if it was not, "
            "get_peft_model(base, the same LoraConfig).save_pretrained(dir) recreates it>) (rank 2r; README: "
            "'Adapters PEFT initialised from the base'); or, if the base you serve already holds the modified weights, "
            "set init_lora_weights to true in adapter_config.json",
        ))  # fmt: skip
    for name in variant_fields(c):
        code, what = LORA_VARIANTS[name]
        out.append(Problem(
            code, "broken", f"{where}: {name}={c[name]!r}: {what}; servers and merge apply plain LoRA (scaling * B @ A "
            "on the base's own linears, every token), which is not what was trained.",
            "serve it with PEFT itself, or retrain as plain LoRA",
        ))  # fmt: skip
    if c.get("trainable_token_indices"):
        out.append(Problem("trainable-tokens", "broken", f"{where}: trainable_token_indices={c['trainable_token_indices']!r}: {TRAINABLE_TOKENS_WHAT}",
                           TRAINABLE_TOKENS_FIX))  # fmt: skip
    if str(c.get("bias", "none")) != "none" or c.get("lora_bias"):
        out.append(Problem(
            "bias", "broken", f"{where}: bias={c.get('bias')!r} / lora_bias={c.get('lora_bias')!r}: trained biases are not LoRA weights servers load.",
            "retrain with bias='none' and lora_bias=false, or merge with PEFT and serve the merged model",
        ))  # fmt: skip
    if isinstance(c.get("target_modules"), str):
        out.append(Problem(
            "regex-target-modules", "fixable",
            f"{where}: target_modules is the pattern {c['target_modules']!r}; SGLang rejects patterns and other "
            "tools may expand them differently.",
            "gemma4-bridge convert writes the explicit module list",
        ))  # fmt: skip
    return out


class Planner:
    """Builds a :class:`CanonicalPlan`; one instance per call."""

    def __init__(
        self,
        config: dict[str, Any],
        source: TensorSource,
        layout: Gemma4Layout | None,
        source_label: str,
        weights_label: str,
        is_pickle: bool,
        adapter_dir: Path | None,
        zero3_checkpoint: str | os.PathLike[str] | None,
        find_zero3: bool,
    ) -> None:
        self.config, self.src, self.layout = config, source, layout
        self.source_label, self.label, self.is_pickle = source_label, weights_label, is_pickle
        self.config_label = f"{source_label}/adapter_config.json"
        self.adapter_dir, self.zero3_arg, self.find_zero3 = adapter_dir, zero3_checkpoint, find_zero3
        self.problems: list[Problem] = []
        self.flavours: list[str] = []
        self.dropped: list[tuple[str, str]] = []
        self.zero3_shapes: dict[str, tuple[int, ...]] = {}  # canonical key -> true shape in the checkpoint
        self.rank_alpha = RankAlphaLookup(config)
        if layout is not None and layout.packed_linears:
            self.problem(
                "quantized-base", "broken",
                f"{layout.source}: a {layout.quantization}-quantized checkpoint that stores its linears packed, without a "
                "'.weight' of their shape (bitsandbytes 4-bit and formats that keep '.weight' are read), so the adapter "
                "cannot be checked against it.",
                "pass the unquantized checkpoint the quantized one was made from: the adapter is the same for both",
            )  # fmt: skip
            self.layout = layout = None  # plan the adapter on its own: every module would otherwise be 'unknown'
        self.expert_planner = ExpertPlanner(
            config, layout, weights_label, self.problem, self.flavour,
            self.rank_alpha,
            lambda r, alpha: lora_scaling(config, r, alpha),
            lambda module: canonical_module_path(module)[0],
        )  # fmt: skip
        self.renamed_example = ""

    def problem(self, code: str, severity: Severity, message: str, fix: str = "", tensors: tuple[str, ...] = ()) -> None:
        self.problems.append(Problem(code, severity, message, fix, tensors))

    def flavour(self, name: str) -> None:
        if name not in self.flavours:
            self.flavours.append(name)

    # -- the steps -------------------------------------------------------------------------
    def run(self) -> CanonicalPlan:
        self._check_config()
        resolved = self._resolve_keys()
        zero3, zero3_names = self._zero3(resolved)
        tensors, modules = self._pair(resolved, zero3, zero3_names)
        self.expert_planner.zero3_names, self.expert_planner.zero3_shapes = zero3_names, self.zero3_shapes
        expert_tensors, experts = self.expert_planner.finish()
        tensors += expert_tensors
        self._check_patterns()
        renamed_tensors = [t for t in tensors if t.key != t.source_key]
        renamed = len(renamed_tensors)
        self.renamed_example = renamed_tensors[0].source_key.split(",")[0] if renamed_tensors else ""
        self._classify(resolved, renamed)
        canonical_config_ = canonical_config(self.config, modules, experts)
        plan_ = CanonicalPlan(
            source=self.source_label,
            weights_label=self.label,
            source_config=self.config,
            config=canonical_config_,
            flavours=self.flavours,
            problems=self.problems,
            tensors=tensors,
            modules=modules,
            dropped=self.dropped,
            renamed=renamed,
            zero3=zero3,
            _source=self.src,
            layout=self.layout,
            experts=experts,
        )
        plan_.zero3_names = zero3_names
        return plan_

    def _check_config(self) -> None:
        problems = config_problems(self.config, self.config_label)
        self.problems += problems
        if any(q.code == "regex-target-modules" for q in problems):
            self.flavour("regex-target-modules")

    def _resolve_keys(self) -> list[tuple[Resolution, tuple[int, ...], str]]:
        """Resolve every key; collect problems for keys that are not usable LoRA weights."""
        out: list[tuple[Resolution, tuple[int, ...], str]] = []
        seen: dict[str, str] = {}
        tables: list[Problem] = []  # by-products of an lm_head / embed_tokens target: said after its own problem
        for key, (shape, dtype) in self.src.specs.items():
            parsed = parse_key(key)
            if parsed is None and SAVED_EMBEDDING_TABLE.search(key):
                tables.append(Problem(
                    "saved-embedding-table", "broken",
                    f"{self.label}: tensor {key} is the whole embedding table, which PEFT saves (save_embedding_layers) "
                    f"when {TIED_OUTPUT} or embed_tokens, which share it, is a target; servers load LoRA factors only.",
                    TIED_OUTPUT_FIX, (key,),
                ))  # fmt: skip
                continue
            if parsed is None and key.endswith(TRAINABLE_TOKENS_TENSOR):
                self.problem("trainable-tokens", "broken", f"{self.label}: tensor {key} holds trainable tokens: {TRAINABLE_TOKENS_WHAT}",
                             TRAINABLE_TOKENS_FIX, (key,))  # fmt: skip
                continue
            if parsed is None:
                code = "modules-to-save" if self.config.get("modules_to_save") or "modules_to_save" in key else "not-lora"
                if code == "not-lora" and key.endswith(".bias"):
                    code = "bias"
                self.problem(
                    code, "broken",
                    f"{self.label}: tensor {key} is not a LoRA factor (lora_A/lora_B); servers cannot load it as LoRA.",
                    "remove it (retrain without modules_to_save/bias), or merge with PEFT and serve the merged model",
                    (key,),
                )  # fmt: skip
                continue
            if parsed.part == "lora_magnitude_vector":
                self.problem("dora", "broken", f"{self.label}: tensor {key} is a DoRA magnitude vector.",
                             "merge with PEFT's merge_and_unload, or retrain with plain LoRA", (key,))  # fmt: skip
                continue
            if parsed.part.startswith("lora_embedding"):
                self.problem("embedding-lora", "broken", f"{self.label}: tensor {key} is an embedding LoRA; gemma4-bridge handles LoRA on linear layers only.",
                             "retrain without the embedding in target_modules", (key,))  # fmt: skip
                continue
            if parsed.kind == "bias":
                self.problem("bias", "broken", f"{self.label}: tensor {key} is a LoRA bias (lora_bias=true), which servers do not load.",
                             "retrain with lora_bias=false, or merge with PEFT and serve the merged model", (key,))  # fmt: skip
                continue
            if parsed.adapter_name:
                self.flavour("adapter-name-in-keys")
            if not parsed.had_peft_prefix:
                self.flavour("no-peft-prefix")
            if self.expert_planner.take(parsed, shape, dtype):
                continue
            res = self._resolve(key, parsed)
            assert res is not None
            # A naming row that only restates the base's own naming (causal-LM keys on a text-only
            # Gemma4ForCausalLM base) is not a flavour to fix.
            own_naming = res.site is not None and parsed.module.removesuffix(".linear") == res.site.model_path.removesuffix(".linear")
            if res.variant not in ("transformers", "unknown") and not own_naming:
                self.flavour(f"{res.variant}-naming")
            if res.added_linear:
                self.flavour("custom-clippable")
            if self.layout is not None and res.site is None:
                self._unresolved(res)
                continue
            if res.canonical_key in seen:
                self.problem(
                    "duplicate", "broken",
                    f"{self.label}: tensors {seen[res.canonical_key]} and {key} are both {res.canonical_key} "
                    "(two adapters saved in one file?).",
                    "save one adapter per directory (PEFT save_pretrained with selected_adapters)", (key,),
                )  # fmt: skip
                continue
            seen[res.canonical_key] = key
            out.append((res, shape, dtype))
        self.problems += tables
        return out

    def _resolve(self, key: str, parsed: ParsedKey | None = None) -> Resolution | None:
        """resolve_key against the base; without a base, the naming table alone (no site, no ``.linear``).
        ``parsed``: the key already parsed."""
        if parsed is None:
            parsed = parse_key(key)
            if parsed is None:
                return None
        if self.layout is not None:
            return resolve_parsed(parsed, self.layout)
        path, variant = canonical_module_path(parsed.module)
        return Resolution(parsed, None, lora_key(path, parsed.part, parsed.kind), variant, False, None)

    def _unresolved(self, res: Resolution) -> None:
        key = res.parsed.key
        assert self.layout is not None and res.reason is not None
        reason = res.reason.message
        if res.reason.code in (Absence.KV_SHARED, Absence.K_EQ_V):
            self.flavour("kv-shared-extras")
            self.dropped.append((key, reason))
            self.problem("absent-module", "fixable", f"{self.label}: tensor {key}: {reason}.", "convert drops it (the model never uses it)", (key,))
        elif res.reason.code == Absence.NO_TOWER:
            self.problem(
                "missing-tower", "broken", f"{self.label}: tensor {key}: {reason}; this adapter was trained on a model with that tower.",
                "pass --base with the model the adapter was trained on", (key,),
            )  # fmt: skip
        elif is_tied_output(res.parsed.module):
            self.problem(
                "tied-output-lora", "broken",
                f"{self.label}: tensor {key} is a LoRA on {TIED_OUTPUT}, the output projection Gemma 4 ties to embed_tokens: "
                "PEFT applies it to the logits only, a merge into the shared table would change the input embeddings "
                "too, and the servers here load no LoRA for it.", TIED_OUTPUT_FIX, (key,),
            )  # fmt: skip
        else:
            self.problem(
                "unknown-module", "broken",
                f"{self.label}: tensor {key} targets {res.parsed.module}, which the base model {self.layout.source} does not have "
                f"({reason}); the adapter was trained for another model (size).",
                "pass --base with the Gemma 4 checkpoint the adapter was trained on", (key,),
            )  # fmt: skip

    def _zero3(self, resolved: list[tuple[Resolution, tuple[int, ...], str]]) -> tuple[Zero3Checkpoint | None, dict[str, str]]:
        expert_damaged = self.expert_planner.damaged_keys()
        damaged = [r.parsed.key for r, shape, _ in resolved if 0 in shape] + expert_damaged
        if not damaged:
            if self.zero3_arg is not None:
                self.problem("zero3-unused", "note", f"{self.label}: no zero-element tensors, so --zero3-checkpoint was not needed.")
            return None, {}
        self.flavour("zero3-damaged")
        from .zero3 import Zero3Checkpoint, locate_checkpoint

        if self.zero3_arg is None and not self.find_zero3:
            self.problem(
                "zero-element", "broken",
                f"{self.label}: {len(damaged)} tensor(s) have zero elements (e.g. {damaged[0]}): saved under DeepSpeed ZeRO-3 without gathering.",
                "pass the DeepSpeed checkpoint directory (the one with 'latest' and global_stepN/)", tuple(damaged),
            )  # fmt: skip
            return None, {}
        try:
            ckpt_dir = locate_checkpoint(self.adapter_dir, self.zero3_arg)
            zero3 = Zero3Checkpoint.open(ckpt_dir)
        except BridgeError as err:
            self.problem(
                "zero-element", "broken",
                f"{self.label}: {len(damaged)} tensor(s) have zero elements (e.g. {damaged[0]}): saved under DeepSpeed "
                f"ZeRO-3 without gathering, and the real values could not be recovered: {err.message}",
                err.fix or "", tuple(damaged),
            )  # fmt: skip
            return None, {}
        names: dict[str, str] = {}
        by_canonical: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, shape in zero3.param_shapes.items():
            ckey = self.expert_planner.canonical_key(name)
            if ckey is None:
                res = self._resolve(name)
                ckey = res.canonical_key if res is not None else None
            if ckey:
                by_canonical[ckey] = (name, shape)
        missing = [r.parsed.key for r, shape, _ in resolved if 0 in shape and r.canonical_key not in by_canonical]
        missing += [k for k in expert_damaged if self.expert_planner.canonical_key(k) not in by_canonical]
        if missing:
            self.problem(
                "zero3-mismatch", "broken",
                f"{zero3.tag_dir}: the DeepSpeed checkpoint has no values for {len(missing)} damaged tensor(s) (e.g. {missing[0]}).",
                "pass --zero3-checkpoint with the checkpoint saved by the same training run", tuple(missing),
            )  # fmt: skip
        for res, _, _ in resolved:
            if res.canonical_key in by_canonical:
                names[res.canonical_key] = by_canonical[res.canonical_key][0]
        expert_intact: list[tuple[str, str]] = []  # (source key, canonical key) checked against the step below
        for key, shape in self.expert_planner.peft_keys():
            ckey = self.expert_planner.canonical_key(key)
            if ckey in by_canonical:
                names[ckey] = by_canonical[ckey][0]
                if 0 not in shape:
                    expert_intact.append((key, ckey))
        self.zero3_shapes = {k: v[1] for k, v in by_canonical.items()}
        self.problem(
            "zero-element", "fixable",
            f"{self.label}: {len(damaged)} tensor(s) have zero elements (ZeRO-3 saved them without gathering).",
            f"convert recovers them from {zero3.tag_dir} ({zero3.world_size} rank(s))", tuple(damaged),
        )  # fmt: skip
        intact = [(r.parsed.key, r.canonical_key) for r, shape, _ in resolved if 0 not in shape and r.canonical_key in names]
        self._check_zero3_step(intact + expert_intact, zero3, names)
        return zero3, names

    def _check_zero3_step(self, intact: list[tuple[str, str]], zero3: Zero3Checkpoint, names: dict[str, str]) -> None:
        """Intact tensors (source key, canonical key), dense and expert alike, must equal the
        checkpoint's: else the checkpoint is from another step and recovery would mix two steps."""
        import torch

        for key, ckey in intact:
            saved = self.src.get(key)
            recovered = zero3.recover(names[ckey]).to(saved.dtype)
            if recovered.shape != saved.shape or not torch.equal(recovered, saved):
                self.problem(
                    "zero3-mismatch", "broken",
                    f"{zero3.tag_dir}: tensor {key} differs between the adapter and the DeepSpeed checkpoint, "
                    "so the checkpoint is from another training step.",
                    "pass --zero3-checkpoint with the global_stepN directory saved at the same step as the adapter",
                    (key,),
                )  # fmt: skip
                return

    def _pair(
        self, resolved: list[tuple[Resolution, tuple[int, ...], str]], zero3: Zero3Checkpoint | None, zero3_names: dict[str, str]
    ) -> tuple[list[PlannedTensor], list[ModuleDelta]]:
        """Group A and B per module, check shapes against the base and ranks against the config."""
        by_module: dict[str, dict[str, PlannedTensor]] = {}
        sites: dict[str, LinearSite | None] = {}
        tensors: list[PlannedTensor] = []
        unrecoverable: set[str] = set()
        source_modules: dict[str, str] = {}  # canonical key -> module path as the source wrote it
        for res, shape, dtype in resolved:
            from_zero3 = 0 in shape and res.canonical_key in zero3_names
            if from_zero3:
                shape = tuple(self.zero3_shapes[res.canonical_key])
            module = res.canonical_key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]  # type: ignore[union-attr]
            if 0 in shape and not from_zero3:
                unrecoverable.add(module)  # reported as broken already
                continue
            assert res.canonical_key is not None
            entry = PlannedTensor(res.canonical_key, res.parsed.key, tuple(shape), dtype, from_zero3)
            by_module.setdefault(module, {})[res.parsed.part] = entry
            sites[module] = res.site
            source_modules[entry.key] = res.parsed.module
            tensors.append(entry)
        modules: list[ModuleDelta] = []
        for module, parts in by_module.items():
            a, b = parts.get("lora_A"), parts.get("lora_B")
            if module in unrecoverable:
                continue
            if a is None or b is None:
                have = (a or b).source_key  # type: ignore[union-attr]
                self.problem("unpaired", "broken", f"{self.label}: tensor {have} has no matching {'lora_B' if b is None else 'lora_A'}.",
                             "the adapter file is incomplete; save it again with PEFT", (have,))  # fmt: skip
                continue
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                self.problem(
                    "rank-mismatch", "broken",
                    f"{self.label}: tensors {a.source_key} {list(a.shape)} and {b.source_key} {list(b.shape)} disagree on the "
                    "rank (lora_A is [r, in], lora_B is [out, r]).",
                    "the adapter is corrupt or mixes two adapters; save it again from the training run", (a.source_key, b.source_key),
                )  # fmt: skip
                continue
            source_module = source_modules[a.key]
            site = sites[module]
            r_cfg, alpha = self.rank_alpha(source_module, *((site.model_path, site.path) if site is not None else (module,)))
            rank = a.shape[0]
            if rank != r_cfg:
                self.problem(
                    "rank-mismatch", "broken",
                    f"{self.label}: tensor {a.source_key} has rank {rank} but adapter_config.json gives {source_module} r={r_cfg}; "
                    "the scaling alpha/r would be wrong.",
                    "fix r / rank_pattern in adapter_config.json to match the tensors", (a.source_key,),
                )  # fmt: skip
                continue
            if site is not None and (a.shape[1] != site.in_features or b.shape[0] != site.out_features):
                self.problem(
                    "shape-mismatch", "broken",
                    f"{self.label}: tensors {a.source_key} {list(a.shape)} / {b.source_key} {list(b.shape)} do not fit "
                    f"{site.path} ({site.in_features} -> {site.out_features}) of the base {self.layout.source if self.layout else ''}: "
                    "the adapter is for another model size.",
                    "pass --base with the Gemma 4 checkpoint the adapter was trained on", (a.source_key, b.source_key),
                )  # fmt: skip
                continue
            if site is None:  # no base: keep the module under its transformers name
                site = LinearSite(module, a.shape[1], b.shape[0], LANGUAGE_MODEL, False)
            modules.append(ModuleDelta(site, a, b, rank, alpha, lora_scaling(self.config, rank, alpha)))
        kept = {m.a.key for m in modules} | {m.b.key for m in modules}
        return [t for t in tensors if t.key in kept], modules

    def _check_patterns(self) -> None:
        """Say which rank_pattern/alpha_pattern keys applied only through a module's canonical name,
        and which applied nowhere (:class:`~.peft_config.RankAlphaLookup`)."""
        where = self.config_label
        for (field, key), (alias, module) in self.rank_alpha.by_alias.items():
            self.problem(
                "pattern-canonical-name", "fixable",
                f"{where}: {field} key {key!r} does not match the module as the tensors name it ({module}) but names "
                f"its canonical path {alias}, so it is applied there (the tensors were renamed after training; PEFT "
                "and stock servers would ignore it and use the default).",
                "convert writes the pattern under the module's canonical name",
            )  # fmt: skip
        for field, key in self.rank_alpha.unused():
            self.problem(
                "unused-pattern", "note",
                f"{where}: {field} key {key!r} matches none of the adapter's modules; PEFT ignores it (with a warning), "
                "and so do convert, merge and the servers.",
                f"remove it from {field}, or rename it to the module it was meant for",
            )  # fmt: skip

    def _classify(self, resolved: list[tuple[Resolution, tuple[int, ...], str]], renamed: int) -> None:
        if self.is_pickle:
            self.flavour("pickle")
            self.problem("pickle", "fixable", f"{self.label}: pickle weights (loaded with weights_only=True).", "convert writes safetensors")
        if renamed:
            self.problem(
                "non-canonical-names", "fixable",
                f"{self.label}: {renamed} tensor name(s) are not in the canonical layout "
                f"(e.g. {self.renamed_example}).",
                "convert renames them",
            )  # fmt: skip
        if self.dropped:
            self.problem(
                "kv-shared-module", "fixable",
                f"{self.label}: {len(self.dropped)} tensor(s) target k_proj/v_proj that KV-shared or k_eq_v layers do not have "
                "(trained on transformers 5.5.0/5.5.1); they never affected the model.",
                "convert drops them with a warning",
                tuple(k for k, _ in self.dropped),
            )  # fmt: skip
            self.problems = [p for p in self.problems if p.code != "absent-module"]
        towers = {r.site.component for r, _, _ in resolved if r.site and COMPONENT_BY_NAME[r.site.component].kind == "tower"}
        if not any(f in self.flavours for f in ("custom-clippable",)) and towers:
            self.flavour("peft-all-linear")
        if not self.flavours:
            self.flavour("canonical")
