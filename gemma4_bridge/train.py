"""A thin layer over transformers + PEFT + TRL that makes Gemma 4 LoRA training correct or loud.

Five things go silently wrong (or need a step the stock stack lacks) when Gemma 4 is LoRA-trained
with the stock stack; each has one fix here:

* Towers: PEFT refuses ``Gemma4ClippableLinear`` (an ``nn.Module`` holding ``.linear`` between two
  clamps), so ``target_modules=["q_proj", ...]`` fails on the multimodal model. :func:`lora_config`
  rewrites any target spec into explicit module paths resolved against :class:`Gemma4Layout`, with
  tower sites pointing at the inner ``...q_proj.linear``. Stock PEFT then wraps a plain ``nn.Linear``
  *inside* the clamp, exactly where a merged weight acts, and reloads with no custom registration.
* KV sharing and the vision tower: on transformers 5.5.0/5.5.1 the KV-shared layers read garbage K/V
  whenever ``use_cache=False`` (TRL always sets it), so :func:`prepare_model` refuses those versions.
  *Reentrant* gradient checkpointing breaks two more things silently: the K/V that ``store`` layers
  hand to the shared layers are produced without grad tracking (the loss is right, the gradients are
  not), and the vision encoder's checkpointed layers see inputs that do not require grad, so every
  vision-tower LoRA gets no gradient at all. :func:`prepare_model` installs a guard that switches all
  checkpointed layers to non-reentrant (with a warning) whoever enabled it, including TRL's forced
  ``use_reentrant=True`` for PEFT + DeepSpeed ZeRO-3.
* Audio attention mask: under ``attn_implementation="eager"`` transformers up to 5.23 builds the
  audio tower's mask as an additive float mask, which ``Gemma4AudioAttention`` reads as boolean
  (``masked_fill(mask.logical_not())``): the tower attends exactly where it should not.
  :func:`prepare_model` gives the audio tower the "sdpa" mask (its attention maths is hand-written
  either way), with a warning. 5.24 fixed it (and refuses "sdpa" there): the model is left alone.

Each repair is keyed to a row of :mod:`gemma4_bridge.upstream_bugs` and installed only where that
bug is present (a cached probe on a tiny in-memory model, an upstream source fact, or a measured
version range); on a fixed release nothing is changed and nothing is printed.
* ZeRO-3: partitioned parameters are ``[0]``-shaped placeholders, so a plain ``save_pretrained``
  writes empty tensors. :func:`save_adapter` gathers first (a collective: call it on every rank).
* Output: :func:`save_adapter` writes the canonical layout through the converters' own planner, so
  the result loads in the vLLM plugin without conversion.

With TRL the whole recipe is one changed name: ``Gemma4SFTTrainer`` instead of ``trl.SFTTrainer``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from gemma4_bridge import __version__
from gemma4_bridge.adapter_io import write_adapter
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import LANGUAGE_MODEL, TIED_OUTPUT, TOWERS, Gemma4Layout, is_tied_output
from gemma4_bridge.output import atomic_output_dir, staged_files
from gemma4_bridge.upstream_bugs import FIXED_KV_SHARING_RELEASE, KV_SHARING_CACHE_RANGE, present


_LAYOUT_ATTR = "_gemma4_bridge_layout"
_GUARD_ATTR = "_gemma4_bridge_checkpoint_guard"


class AudioAttentionMaskWarning(UserWarning):
    """The audio tower was switched from the eager mask (read inverted) to the sdpa mask."""


class ReentrantCheckpointWarning(UserWarning):
    """Reentrant gradient checkpointing was switched to non-reentrant (KV-sharing layers, vision tower)."""


# -- the model ---------------------------------------------------------------------------------
def layout_of(model: torch.nn.Module) -> Gemma4Layout:
    """The :class:`Gemma4Layout` of an instantiated (possibly ZeRO-3 partitioned) transformers model."""
    cached = getattr(model, _LAYOUT_ATTR, None)
    if cached is not None:
        return cached
    base = _unwrap(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in base.named_parameters():
        if (name := _base_name(name)) is not None:
            shapes[name] = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the true shape in ds_shape
    for name, buffer in base.named_buffers():
        if (name := _base_name(name)) is not None:
            shapes[name] = tuple(buffer.shape)
    for name, module in base.named_modules():  # quantized linears (bitsandbytes 4-bit) store weights packed
        key = _base_name(f"{name}.weight")
        in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if "weight" in module._parameters and key in shapes and isinstance(in_features, int) and isinstance(out_features, int):
            if math.prod(shapes[key]) != in_features * out_features:
                shapes[key] = (out_features, in_features)
    return Gemma4Layout.from_config(base.config.to_dict(), shapes, source=type(base).__name__)


def _base_name(name: str) -> str | None:
    """A parameter's checkpoint name once PEFT has wrapped its module; None for adapter weights."""
    if ".lora_" in name or ".modules_to_save." in name:
        return None
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Check a Gemma 4 model for the silent training failures and install their repairs; returns it.

    Idempotent; call it on the transformers model before ``get_peft_model`` (``Gemma4SFTTrainer``
    does it for you).
    """
    base = _unwrap(model)
    layout = layout_of(base)
    check_transformers_version(layout)
    repair_audio_attention_mask(base)
    if _reentrant_checkpointing_breaks(layout) and not getattr(base, _GUARD_ATTR, None):
        _text_decoder(base)  # fail early on a model that is not a Gemma 4 transformers model
        handle = base.register_forward_pre_hook(_ReentrantCheckpointGuard(layout))
        object.__setattr__(base, _GUARD_ATTR, handle)  # not an nn.Module attribute: keep it out of state
    object.__setattr__(base, _LAYOUT_ATTR, layout)
    return model


def _reentrant_checkpointing_breaks(layout: Gemma4Layout) -> bool:
    """Whether reentrant checkpointing trains this model wrong here (probed once per process)."""
    kv = bool(layout.kv_shared_layers) and present("transformers-reentrant-kv-sharing")
    vision = "vision" in layout.towers and present("torch-reentrant-frozen-inputs")
    return kv or vision


def repair_audio_attention_mask(model: torch.nn.Module) -> bool:
    """Give the audio tower the boolean ("sdpa") mask it is written for; True if it had the eager one.

    ``Gemma4AudioModel`` builds its mask for the configured attention implementation, but
    ``Gemma4AudioAttention`` always computes attention by hand and masks with
    ``masked_fill(mask.logical_not(), ...)``. Under "eager" the mask is additive floats (0 where
    allowed), so ``logical_not`` selects the allowed positions: audio training would learn from a
    tower that attends to padding and out-of-window frames. Only the mask changes here.
    """
    audio_tower = getattr(getattr(_unwrap(model), "model", None), TOWERS["audio"], None)
    if audio_tower is None or audio_tower.config._attn_implementation != "eager":
        return False
    if not present("transformers-eager-audio-mask"):  # fixed upstream (5.24): eager is right there
        return False
    audio_tower.config._attn_implementation = "sdpa"
    warnings.warn(
        "gemma4-bridge: the audio tower was loaded with attn_implementation='eager', whose mask "
        "Gemma4AudioAttention reads inverted (it attends where it should not); switched the audio "
        "tower to the 'sdpa' mask. Text and vision attention are unchanged.",
        AudioAttentionMaskWarning,
        stacklevel=3,
    )
    return True


def check_transformers_version(layout: Gemma4Layout, version: str | None = None) -> None:
    """Refuse transformers 5.5.0/5.5.1 on a model with KV-shared layers (they train on garbage K/V)."""
    if not layout.kv_shared_layers:
        return
    if version is None:
        import transformers

        version = transformers.__version__
    if Version(Version(version).base_version) in SpecifierSet(KV_SHARING_CACHE_RANGE):
        raise BridgeError(
            f"transformers {version} computes wrong K/V for the KV-shared layers {list(layout.kv_shared_layers)} "
            "whenever use_cache=False, which every trainer sets (transformers issue 45242): the loss looks "
            "plausible but the model learns from garbage.",
            fix=f"install transformers>={FIXED_KV_SHARING_RELEASE} (pip install -U 'transformers>={FIXED_KV_SHARING_RELEASE}')",
        )


class _ReentrantCheckpointGuard:
    """Forward pre-hook on the whole model: before each training forward, make checkpointing non-reentrant.

    Checking at forward time (not at ``gradient_checkpointing_enable``) catches every way of turning
    checkpointing on: the user, ``transformers.Trainer``, and TRL's forced ``use_reentrant=True``. The
    hook sits on the top-level model so the vision encoder's layers, which run before the text
    decoder, are switched too.
    """

    def __init__(self, layout: Gemma4Layout) -> None:
        self.layout = layout
        self.warned = False
        self.checkpointable: list[torch.nn.Module] | None = None

    def __call__(self, model: torch.nn.Module, args: Any) -> None:
        if not model.training:
            return
        if self.checkpointable is None:  # the module tree is fixed once PEFT has wrapped it
            self.checkpointable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        for module in self.checkpointable:
            if not module.gradient_checkpointing:
                continue
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is None or not _is_reentrant(func):
                continue
            module._gradient_checkpointing_func = self._non_reentrant(func, model)

    def _reasons(self) -> list[str]:
        reasons = []
        if self.layout.kv_shared_layers and present("transformers-reentrant-kv-sharing"):
            reasons.append(
                f"layers {list(self.layout.kv_shared_layers)} reuse the K/V of layers {list(self.layout.kv_store_layers)}, "
                "which reentrant checkpointing recomputes without grad tracking (the loss is right, the gradients "
                "of every layer up to the K/V-storing ones are wrong)"
            )
        if "vision" in self.layout.towers and present("torch-reentrant-frozen-inputs"):
            reasons.append(
                "the vision encoder's checkpointed layers get inputs that do not require grad, so reentrant "
                "checkpointing gives every vision-tower LoRA no gradient at all"
            )
        return reasons

    def _non_reentrant(self, func: Callable[..., Any], model: torch.nn.Module) -> Callable[..., Any]:
        if not isinstance(func, functools.partial):
            raise BridgeError(
                "gradient checkpointing on this Gemma 4 uses a custom checkpoint function that gemma4-bridge cannot "
                "inspect; if it is reentrant, training is silently wrong: " + "; and ".join(self._reasons()) + ".",
                fix="enable checkpointing with model.gradient_checkpointing_enable("
                "gradient_checkpointing_kwargs={'use_reentrant': False})",
            )
        _require_zero3_recompute_support(model)
        if not self.warned:
            self.warned = True
            message = (
                "Gemma 4 with reentrant gradient checkpointing trains wrong: " + "; and ".join(self._reasons())
                + ". gemma4-bridge switched checkpointing to use_reentrant=False (exact)."
            )
            warnings.warn(message, ReentrantCheckpointWarning, stacklevel=2)
        return functools.partial(func.func, *func.args, **{**func.keywords, "use_reentrant": False})


def _is_reentrant(func: Callable[..., Any]) -> bool:
    # transformers binds the checkpoint kwargs with functools.partial; torch treats a missing flag as
    # reentrant in the releases that still accept it, so anything but an explicit False counts.
    keywords = getattr(func, "keywords", None)
    return not (isinstance(keywords, dict) and keywords.get("use_reentrant") is False)


def _require_zero3_recompute_support(model: torch.nn.Module) -> None:
    """Non-reentrant recompute under ZeRO-3 needs DeepSpeed's recompute attribution (DeepSpeed PR 8130)."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return
    if present("deepspeed-zero3-nonreentrant"):
        import deepspeed

        raise BridgeError(
            f"DeepSpeed {deepspeed.__version__} ZeRO-3 cannot run non-reentrant gradient checkpointing "
            "(CheckpointError, DeepSpeed issue 4332), and reentrant checkpointing gives wrong gradients on "
            "Gemma 4's KV-sharing layers.",
            fix="upgrade DeepSpeed to a release with PR 8130 (0.19.8 works), or set gradient_checkpointing=False",
        )


def _text_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The Gemma 4 text model, whose forward calls the decoder layers (and so is called, not forwarded)."""
    inner = getattr(model, "model", None)
    decoder = getattr(inner, LANGUAGE_MODEL, None) or inner
    if decoder is None or not hasattr(decoder, "layers"):
        raise BridgeError(
            f"{type(model).__name__} is not a Gemma 4 transformers model (no model.{LANGUAGE_MODEL}.layers).",
            fix="pass the model loaded with Gemma4ForConditionalGeneration / Gemma4ForCausalLM.from_pretrained",
        )
    return decoder


def _unwrap(model: Any) -> torch.nn.Module:
    """The transformers model under a DeepSpeed engine and/or a PeftModel."""
    model = getattr(model, "module", model)  # DeepSpeedEngine / DDP
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# -- LoRA targets -------------------------------------------------------------------------------
def resolve_target_modules(model: torch.nn.Module, config: Any) -> list[str]:
    """Explicit module paths for a PEFT config's target spec, tower sites replaced by their ``.linear``.

    Matching is PEFT's own (``check_target_module_exists``: suffix lists, regexes, ``exclude_modules``,
    ``layers_to_transform``), applied to every module; ``"all-linear"`` means every LoRA-able linear
    of the layout (PEFT's meaning: ``lm_head`` excluded).
    """
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    base = _unwrap(model)
    layout = layout_of(base)
    wrappers = {site.wrapper_path: site.path for site in layout.linears.values() if site.clippable}
    probe = config
    if config.target_modules is None:  # PEFT's own default for the model type (gemma4: text q/v only)
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(base.config.model_type)
        if default is None:
            raise BridgeError(f"no target_modules given and PEFT has no default for {base.config.model_type!r}.", fix="set target_modules")
        probe = dataclasses.replace(config, target_modules=default)
    if probe.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        probe = dataclasses.replace(config, target_modules=sorted(layout.linears))
    targets: set[str] = set()
    for name, _ in base.named_modules():
        if not name or not check_target_module_exists(probe, name):
            continue
        targets.add(wrappers.get(name, name))
    if not targets:
        raise BridgeError(
            f"target_modules={config.target_modules!r} matches no module of this Gemma 4 model.",
            fix=f"name linears as PEFT does, e.g. ['q_proj', 'v_proj'], a regex like '.*{LANGUAGE_MODEL}.*\\.q_proj', "
            "or 'all-linear'",
        )
    outside = sorted(t for t in targets if t not in layout.linears)
    if outside:
        tied = any(is_tied_output(t) for t in outside)
        why = f" ({TIED_OUTPUT} is tied to embed_tokens: PEFT would save the whole table, and a merge would change the input embeddings too)"
        raise BridgeError(
            f"target_modules={config.target_modules!r} reaches {', '.join(outside[:3])}"
            f"{f' (and {len(outside) - 3} more)' if len(outside) > 3 else ''}, not a linear of the model's LoRA "
            f"layout{why if tied else ''}; the adapter could not be served or merged.",
            fix=_narrowing_fix(config.target_modules, outside, targets - set(outside), wrappers),
        )
    return sorted(targets)


def _narrowing_fix(target_modules: Any, outside: list[str], linears: set[str], wrappers: Mapping[str, str]) -> str:
    """How to keep a target spec to linears: for a pattern (which PEFT matches against containers too,
    e.g. '.*vision_tower.*'), the same pattern ending in the linears it meant; for names, leave the
    others out."""
    if isinstance(target_modules, str) and linears:
        by_site = {site: wrapper for wrapper, site in wrappers.items()}
        leaves = sorted({by_site.get(t, t).rpartition(".")[2] for t in linears})
        suggestion = target_modules + "\\.(" + "|".join(leaves) + ")"
        return (f"end the pattern in the linears it should reach, e.g. r'{suggestion}' "
                "(PEFT matches a pattern against every module, containers too), or use 'all-linear'")
    return f"leave {', '.join(sorted({t.rpartition('.')[2] for t in outside}))} out of target_modules ('all-linear' does)"


def resolve_target_parameters(model: torch.nn.Module, config: Any) -> list[str]:
    """Explicit MoE expert parameter paths for ``config.target_parameters`` (PEFT's matching: the
    full name or a ``.``-suffix, e.g. ``experts.gate_up_proj``); anything else is refused.

    Gemma 4's only 3-D parameters PEFT can adapt are the experts of 26B-A4B-style MoE layers; the
    canonical adapter, merge and inspect understand LoRA on them (vLLM/SGLang serve it merged).
    """
    names = list(getattr(config, "target_parameters", None) or [])
    if not names:
        return []
    layout = layout_of(model)
    found: list[str] = []
    for name in names:
        hits = [site.path for site in layout.experts.values() if site.path == name or site.path.endswith(f".{name}")]
        if not hits:
            where = f"the experts of this model: {sorted({s.param for s in layout.experts.values()})}" if layout.experts else "none: this model has no MoE experts"
            raise BridgeError(
                f"target_parameters entry {name!r} matches no MoE expert parameter (LoRA on raw parameters: {where}).",
                fix="target linears with target_modules; use target_parameters=['experts.gate_up_proj', 'experts.down_proj'] "
                "on a MoE (26B-A4B) model only",
            )
        found += hits
    if getattr(config, "lora_dropout", 0.0):
        raise BridgeError(
            f"lora_dropout={config.lora_dropout} with target_parameters: PEFT cannot apply dropout to LoRA on expert "
            "parameters (the delta is added to the weight, not to an activation).",
            fix="set lora_dropout=0.0",
        )
    return sorted(set(found))


def lora_config(model: torch.nn.Module, config: Any) -> Any:
    """A copy of ``config`` (a ``peft.LoraConfig``) whose targets are explicit, clamp-safe module paths.

    Layer selection (``layers_to_transform``, ``exclude_modules``) is already applied to the list, so
    it is cleared; ``rank_pattern``/``alpha_pattern`` are expanded per target, matched against the
    name the user sees (``q_proj`` for a tower's ``q_proj.linear``).

    A config whose adapter could not be served or merged as trained (DoRA, a base-modifying init
    such as PiSSA, a LoRA variant, modules_to_save, trainable tokens, biases) is refused here, before training, by
    the planner's own checks: ``save_adapter`` would refuse it only after the run.
    """
    from gemma4_bridge.converters.planner import config_problems

    refused = [q for q in config_problems(_config_dict(config), "LoraConfig") if q.severity == "broken"]
    if refused:
        raise BridgeError(
            " ".join(q.message for q in refused),
            fix="train plain LoRA (init_lora_weights True, 'gaussian', 'eva' or 'orthogonal'; no DoRA, variant, "
            f"modules_to_save, trainable_token_indices or bias), or train with PEFT itself and then: {refused[0].fix}",
        )
    parameters = resolve_target_parameters(model, config)
    if parameters and config.target_modules is not None and not config.target_modules:
        targets: list[str] = []  # experts only (target_modules=[])
    else:
        targets = resolve_target_modules(model, config)
    wrapper_of = {site.path: site.wrapper_path for site in layout_of(model).linears.values() if site.clippable}
    return dataclasses.replace(
        config,
        target_modules=targets,
        target_parameters=parameters or None,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern=_expand_pattern(config.rank_pattern, [*targets, *parameters], wrapper_of),
        alpha_pattern=_expand_pattern(config.alpha_pattern, [*targets, *parameters], wrapper_of),
    )


def _expand_pattern(pattern: Mapping[str, Any] | None, targets: Iterable[str], wrapper_of: Mapping[str, str]) -> dict[str, Any]:
    from gemma4_bridge.converters.peft_config import pattern_key

    if not pattern:
        return {}
    expanded = {}
    for target in targets:
        for name in (target, wrapper_of.get(target)):
            if name is None:
                continue
            key = pattern_key(pattern, name)
            if key is not None:
                expanded[target] = pattern[key]
                break
    return expanded


# -- saving -------------------------------------------------------------------------------------
def adapter_tensors(model: Any, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's PEFT state dict with real values: ZeRO-3 partitions are gathered (collective)."""
    from peft import get_peft_model_state_dict

    peft_model = getattr(model, "module", model)
    params = [p for n, p in peft_model.named_parameters() if adapter_name in n and hasattr(p, "ds_id")]
    if not params:
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        return {k: v.detach().cpu().clone() for k, v in state.items()}


def save_adapter(model: Any, out_dir: str | os.PathLike[str], *, adapter_name: str = "default") -> Path | None:
    """Write the trained adapter in the canonical layout the converters and plugins use.

    Under ZeRO-3 this gathers the partitioned LoRA weights, so every rank must call it; rank 0
    writes and returns the path, other ranks return None. Like ``save_pretrained`` it writes
    ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir`` (created if needed),
    each file replaced atomically, leaving anything else there (tokenizer, trainer state) alone.
    """
    from gemma4_bridge.converters.canonical import canonicalize

    peft_model = getattr(model, "module", model)
    tensors = adapter_tensors(peft_model, adapter_name)
    if _rank() != 0:
        return None
    layout = layout_of(_unwrap(peft_model))
    config = _config_dict(peft_model.peft_config[adapter_name])
    canon_config, canon_tensors, plan = canonicalize((config, tensors), layout)
    empty = sorted(k for k, v in canon_tensors.items() if v.numel() == 0)
    if empty:  # canonicalize refuses these; this is the last line of defence before a file exists
        raise BridgeError(f"adapter tensors {empty[:3]} have no elements.", fix="call save_adapter on every rank")
    metadata = {
        **plan.metadata(),
        "source": "gemma4_bridge.train",
        "tool": f"gemma4-bridge {__version__}",
        "trained_with": _stack_versions(),
    }
    out = Path(out_dir)
    if not out.is_dir():
        with atomic_output_dir(out) as tmp:
            write_adapter(tmp, canon_config, canon_tensors, metadata)
        return out
    with staged_files(out) as tmp:  # each file replaced atomically; a killed run's temp dir is swept
        write_adapter(tmp, canon_config, canon_tensors, metadata)
    return out


def _config_dict(peft_config: Any) -> dict[str, Any]:
    """The adapter_config.json PEFT would write (inference_mode on, sets as sorted lists)."""
    config = dataclasses.replace(peft_config, inference_mode=True).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def _stack_versions() -> dict[str, str]:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__}


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


# -- data ---------------------------------------------------------------------------------------
def multimodal_collator(processor: Any, *, max_length: int | None = None) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """A collator for SFT on text + image + audio rows: ``{"text": str, "images": [...], "audio": [...]}``.

    The text carries the processor's ``image_token`` / ``audio_token`` once per item; the processor
    expands them. Labels are the input ids with padding and the multimodal soft tokens masked.
    Use with ``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)``.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    masked = {tokenizer.pad_token_id}
    for attr in ("image_token", "audio_token", "boi_token", "eoi_token", "boa_token", "eoa_token"):
        token = getattr(processor, attr, None)
        if token is not None:
            masked.add(tokenizer.convert_tokens_to_ids(token))

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"text": [row["text"] for row in rows], "return_tensors": "pt", "padding": True}
        if any(row.get("images") for row in rows):
            kwargs["images"] = [row.get("images") or [] for row in rows]
        if any(row.get("audio") for row in rows):
            kwargs["audio"] = [np.asarray(clip, dtype=np.float32) for row in rows for clip in row.get("audio") or []]
        if max_length is not None:
            kwargs.update(truncation=True, max_length=max_length)
        batch = dict(processor(**kwargs))
        labels = batch["input_ids"].clone()
        labels[torch.isin(labels, torch.tensor(sorted(masked)))] = -100
        batch["labels"] = labels
        return batch

    return collate


# -- TRL ----------------------------------------------------------------------------------------
def _make_trainer_class() -> type:
    from trl import SFTTrainer

    class Gemma4SFTTrainer(SFTTrainer):
        """``trl.SFTTrainer`` for Gemma 4: prepared model, clamp-safe targets, canonical gathered adapters.

        Same arguments as ``SFTTrainer``. Saving (checkpoints, ``save_model`` and the PEFT model's
        ``save_pretrained``) writes the canonical adapter with gathered ZeRO-3 values.
        """

        def __init__(self, model: Any, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
            if isinstance(model, str | os.PathLike):
                raise BridgeError(
                    "Gemma4SFTTrainer needs the loaded model, not a name.",
                    fix="load it first: Gemma4ForConditionalGeneration.from_pretrained(path, dtype=...)",
                )
            prepare_model(model)
            if peft_config is not None:
                peft_config = lora_config(model, peft_config)
            super().__init__(model, *args, peft_config=peft_config, **kwargs)
            if hasattr(self.model, "peft_config"):
                self.model.save_pretrained = _guarded_save_pretrained(self.model)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            super().save_model(output_dir, _internal_call=_internal_call)
            if hasattr(self.model, "peft_config"):
                save_adapter(self.model, output_dir or self.args.output_dir)

    return Gemma4SFTTrainer


def _guarded_save_pretrained(peft_model: Any) -> Callable[..., None]:
    """``save_pretrained`` for the trained PEFT model: canonical output, never ``[0]``-shaped tensors.

    The trainer's own call passes a gathered ``state_dict`` and keeps PEFT's behaviour (``save_model``
    then rewrites the files canonically). A bare call under ZeRO-3 is refused rather than gathered:
    it is usually made on rank 0 only, where a gather would hang.
    """
    original = peft_model.save_pretrained

    def save_pretrained(save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        if "state_dict" in kwargs:
            original(save_directory, **kwargs)
        elif present("peft-zero3-empty-save") and any(hasattr(p, "ds_id") for p in peft_model.parameters()):
            raise BridgeError(
                f"model.save_pretrained({str(save_directory)!r}) under DeepSpeed ZeRO-3 would write zero-element "
                "tensors (each rank holds only a partition).",
                fix="call trainer.save_model(dir) or gemma4_bridge.train.save_adapter(model, dir) on every rank",
            )
        else:
            save_adapter(peft_model, save_directory)

    return save_pretrained


def __getattr__(name: str) -> Any:
    # Gemma4SFTTrainer subclasses trl.SFTTrainer; build it on first use so plain-PEFT users need no TRL.
    if name == "Gemma4SFTTrainer":
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
