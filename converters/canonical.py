"""Turn any Gemma 4 LoRA adapter into the canonical layout, in memory: the one place that decides.

``convert`` (to disk), ``merge``, ``inspect`` and the serving plugins all call :func:`plan` (or
:func:`canonicalize`), so an adapter is renamed, dropped or refused the same way everywhere.

A plan is built from tensor *shapes* only (safetensors headers); values are read one tensor at a
time when :meth:`CanonicalPlan.load` is called, so a plan for a 1 GB adapter costs kilobytes.
Problems are collected, not raised: ``fixable`` ones the plan fixes (renames, KV-shared tensors
dropped, ZeRO-3 values recovered), ``broken`` ones it cannot; :meth:`CanonicalPlan.raise_if_broken`
turns the first broken problem into a :class:`BridgeError` naming file, tensor and fix.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gemma4_bridge import __version__
from gemma4_bridge.adapter_io import AdapterDir
from gemma4_bridge.errors import BridgeError, ErrorCode
from gemma4_bridge.layout import COMPONENT_BY_NAME, Absence, LANGUAGE_MODEL, Gemma4Layout, LinearSite
from gemma4_bridge.names import PEFT_PREFIX, Resolution, canonical_module_path, lora_key, parse_key, resolve_key

from .safetensors_stream import CODE_TO_DTYPE, DTYPES, SafetensorsReader

if TYPE_CHECKING:
    from .zero3 import Zero3Checkpoint

Severity = Literal["fixable", "broken", "note"]
# Config fields that only select modules; the canonical config lists modules explicitly instead.
LORA_DTYPES = ("F32", "BF16", "F16", "F64")
SELECTION_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an adapter, with what fixes it."""

    code: str  # stable id, e.g. "zero-element", "kv-shared-module", "shape-mismatch"
    severity: Severity
    message: str
    fix: str = ""
    tensors: tuple[str, ...] = ()

    def as_error(self) -> BridgeError:
        return BridgeError(self.message, fix=self.fix or None)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the canonical adapter and where its values come from."""

    key: str  # canonical key
    source_key: str  # key in the source adapter
    shape: tuple[int, ...]
    dtype: str  # torch dtype name of the output (the source tensor's dtype)
    from_zero3: bool = False  # values recovered from the DeepSpeed checkpoint


@dataclass(frozen=True)
class ModuleDelta:
    """One LoRA'd linear of the canonical adapter: delta = scaling * B @ A on ``site``."""

    site: LinearSite
    a: PlannedTensor
    b: PlannedTensor
    rank: int
    alpha: float
    scaling: float


class TensorSource:
    """Read-only access to the source adapter's tensors: shapes first, values one at a time."""

    def __init__(
        self,
        label: str,
        specs: Mapping[str, tuple[tuple[int, ...], str]],
        getter: Callable[..., Any],
        reader: SafetensorsReader | None = None,
    ):
        self.label = label
        self.specs = dict(specs)  # key -> (shape, torch dtype name)
        self._get = getter
        self.reader = reader  # set for safetensors files: reads can go into a reused buffer

    @classmethod
    def from_adapter_dir(cls, adapter: AdapterDir) -> TensorSource:
        if adapter.is_pickle:
            state = adapter._pickle_state()  # weights_only=True, allow-listed
            return cls.from_tensors(str(adapter.weights), state)
        from gemma4_bridge.layout import read_safetensors_header

        header = read_safetensors_header(adapter.weights)
        specs: dict[str, tuple[tuple[int, ...], str]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info.get("dtype") not in LORA_DTYPES:
                raise BridgeError(
                    f"{adapter.weights}: tensor {key} has dtype {info.get('dtype')}, not a LoRA weight dtype.",
                    fix="save LoRA weights in float32, bfloat16 or float16",
                )
            specs[key] = (tuple(info["shape"]), CODE_TO_DTYPE[info["dtype"]])
        reader = SafetensorsReader(adapter.weights, header)

        def get(key: str, scratch: Any = None) -> Any:
            try:
                return reader.get(key, scratch)
            except (OSError, ValueError, KeyError) as exc:
                raise BridgeError(
                    f"{adapter.weights}: could not read tensor {key} ({exc}).",
                    fix="the file is truncated or corrupt; copy it again from where it was trained",
                    code=ErrorCode.UNREADABLE,
                ) from exc

        return cls(str(adapter.weights), specs, get, reader)

    @classmethod
    def from_tensors(cls, label: str, tensors: Mapping[str, Any]) -> TensorSource:
        specs = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
        return cls(label, specs, tensors.__getitem__)

    def get(self, key: str, scratch: Any = None) -> Any:
        return self._get(key, scratch) if self.reader is not None else self._get(key)


@dataclass
class CanonicalPlan:
    """Everything decided about one adapter before any tensor value is read."""

    source: str  # adapter directory (or label of in-memory tensors)
    weights_label: str  # the weights file, for messages
    source_config: dict[str, Any]
    config: dict[str, Any]  # canonical adapter_config.json
    flavours: list[str]
    problems: list[Problem]
    tensors: list[PlannedTensor]
    modules: list[ModuleDelta]
    dropped: list[tuple[str, str]]  # (source key, why)
    renamed: int
    zero3: Zero3Checkpoint | None
    _source: TensorSource = field(repr=False)
    layout: Gemma4Layout | None = field(default=None, repr=False)  # the base it was planned against

    @property
    def broken(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "broken"]

    @property
    def fixable(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "fixable"]

    @property
    def healthy(self) -> bool:
        return not self.broken and not self.fixable

    def raise_if_broken(self) -> None:
        if self.broken:
            first = self.broken[0]
            more = len(self.broken) - 1
            if more:
                raise BridgeError(f"{first.message} ({more} more problem(s): run 'gemma4-bridge inspect').", fix=first.fix or None)
            raise first.as_error()

    def load(self, entry: PlannedTensor, scratch: Any = None) -> Any:
        """The values of one canonical tensor: read or recovered, cast, checked finite.

        With ``scratch`` (a uint8 tensor) a file-backed source tensor is read into it, no allocation.
        """
        import torch

        if entry.from_zero3:
            assert self.zero3 is not None
            tensor = self.zero3.recover(self.zero3_names[entry.key], scratch)
        else:
            tensor = self._source.get(entry.source_key, scratch)
        tensor = tensor.to(getattr(torch, entry.dtype))
        self._check_finite(entry, tensor)
        return tensor

    def raw_bytes(self, entry: PlannedTensor) -> memoryview | None:
        """The source bytes of ``entry`` when they are its canonical bytes (a renamed tensor of a
        safetensors file, same dtype), checked finite; else None (use :meth:`load`).

        No tensor is built or copied: the bytes are a view of a memory-mapped window of the source,
        valid until the next call. Writing them out is then the only copy, as in a file copy.
        """
        reader = self._source.reader
        if entry.from_zero3 or reader is None or reader.header[entry.source_key]["dtype"] != DTYPES[entry.dtype][0]:
            return None
        try:
            mapped = reader.mapped(entry.source_key)
        except (OSError, ValueError) as exc:
            raise BridgeError(
                f"{self.weights_label}: could not read tensor {entry.source_key} ({exc}).",
                fix="the file is truncated or corrupt; copy it again from where it was trained",
                code=ErrorCode.UNREADABLE,
            ) from exc
        if mapped is None:
            return None
        raw, tensor = mapped
        self._check_finite(entry, tensor)
        return raw

    def close(self) -> None:
        """Release the source's memory-mapped window (see :meth:`raw_bytes`) and checkpoint files."""
        if self._source.reader is not None:
            self._source.reader.close()
        if self.zero3 is not None:
            self.zero3.close()

    def _check_finite(self, entry: PlannedTensor, tensor: Any) -> None:
        import torch

        # A sum is finite iff every value is (NaN/Inf propagate); only an overflowing sum of
        # huge finite values needs the exact, 20x slower element-wise check.
        if tensor.is_floating_point() and not math.isfinite(tensor.sum().item()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            where = f"{self.zero3.tag_dir} (recovered)" if entry.from_zero3 and self.zero3 else self.weights_label
            raise BridgeError(
                f"{where}: tensor {entry.source_key} has {bad} NaN/Inf value(s); serving it would produce garbage.",
                fix="the training run diverged; use an earlier checkpoint or retrain with a lower learning rate",
                code=ErrorCode.NON_FINITE,
            )

    def iter_tensors(self) -> Iterator[tuple[PlannedTensor, Any]]:
        for entry in self.tensors:
            yield entry, self.load(entry)

    def metadata(self) -> dict[str, Any]:
        """The conversion record stored in the output's safetensors metadata."""
        return {
            "tool": f"gemma4-bridge {__version__}",
            "source": self.source,
            "source_flavours": self.flavours,
            "renamed_tensors": self.renamed,
            "dropped": [{"tensor": k, "why": why} for k, why in self.dropped],
            "zero3_recovered": sum(t.from_zero3 for t in self.tensors),
            "zero3_checkpoint": str(self.zero3.tag_dir) if self.zero3 else None,
        }

    zero3_names: dict[str, str] = field(default_factory=dict, repr=False)  # canonical key -> checkpoint name


def find_layout(base: str | os.PathLike[str] | None, adapter_config: Mapping[str, Any] | None = None) -> Gemma4Layout | None:
    """The base model's layout: ``base`` if given, else ``base_model_name_or_path`` if it is a local model dir."""
    if base is not None:
        return Gemma4Layout.from_model_dir(base)
    guess = (adapter_config or {}).get("base_model_name_or_path")
    if guess and (Path(guess) / "config.json").is_file():
        return Gemma4Layout.from_model_dir(guess)
    return None


def canonicalize(
    adapter: str | os.PathLike[str] | tuple[Mapping[str, Any], Mapping[str, Any]],
    layout: Gemma4Layout,
    *,
    zero3_checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], CanonicalPlan]:
    """Canonical ``(config, tensors, plan)`` for an adapter directory or an in-memory ``(config, tensors)``.

    Raises :class:`BridgeError` if the adapter cannot be served as trained. ``plan`` is the report:
    ``plan.flavours``, ``plan.problems`` (fixed ones included), ``plan.dropped``, ``plan.metadata()``.
    """
    p = plan(adapter, layout, zero3_checkpoint=zero3_checkpoint)
    p.raise_if_broken()
    return p.config, {entry.key: tensor for entry, tensor in p.iter_tensors()}, p


def plan(
    adapter: str | os.PathLike[str] | tuple[Mapping[str, Any], Mapping[str, Any]],
    layout: Gemma4Layout | None,
    *,
    zero3_checkpoint: str | os.PathLike[str] | None = None,
    find_zero3: bool = True,
) -> CanonicalPlan:
    """Decide names, drops and recoveries for an adapter; see the module docstring.

    With ``layout=None`` (no base model known) only name-level checks run: shapes, KV sharing and
    tower ``.linear`` placement need the base.
    """
    if isinstance(adapter, tuple):
        config, tensors = dict(adapter[0]), adapter[1]
        source, label, is_pickle = "<in-memory adapter>", "<in-memory adapter>", False
        tensor_source = TensorSource.from_tensors(label, tensors)
        adapter_dir: Path | None = None
    else:
        ad = AdapterDir.open(adapter)
        config, source, label, is_pickle = ad.config, str(ad.path), str(ad.weights), ad.is_pickle
        tensor_source = TensorSource.from_adapter_dir(ad)
        adapter_dir = ad.path
    return _Planner(config, tensor_source, layout, source, label, is_pickle, adapter_dir, zero3_checkpoint, find_zero3).run()


def effective_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, alpha) PEFT uses for ``module`` (rank_pattern/alpha_pattern matched as PEFT matches them)."""
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    for key, value in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            r = int(value)
            break
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = float(value)
            break
    return r, alpha


def lora_scaling(config: Mapping[str, Any], r: int, alpha: float) -> float:
    return alpha / (r**0.5) if config.get("use_rslora") else alpha / r


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


class _Planner:
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
        self.adapter_dir, self.zero3_arg, self.find_zero3 = adapter_dir, zero3_checkpoint, find_zero3
        self.problems: list[Problem] = []
        self.flavours: list[str] = []
        self.dropped: list[tuple[str, str]] = []
        self.zero3_shapes: dict[str, tuple[int, ...]] = {}  # canonical key -> true shape in the checkpoint

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
        renamed = sum(1 for t in tensors if t.key != t.source_key)
        self._classify(resolved, renamed)
        canonical_config = self._canonical_config(modules)
        plan_ = CanonicalPlan(
            source=self.source_label,
            weights_label=self.label,
            source_config=self.config,
            config=canonical_config,
            flavours=self.flavours,
            problems=self.problems,
            tensors=tensors,
            modules=modules,
            dropped=self.dropped,
            renamed=renamed,
            zero3=zero3,
            _source=self.src,
            layout=self.layout,
        )
        plan_.zero3_names = zero3_names
        return plan_

    def _check_config(self) -> None:
        c, where = self.config, f"{self.source_label}/adapter_config.json"
        if c.get("modules_to_save"):
            self.problem(
                "modules-to-save", "broken",
                f"{where}: modules_to_save={c['modules_to_save']} holds fully trained modules, which vLLM and SGLang "
                "cannot load as LoRA (vLLM refuses the adapter).",
                "retrain without modules_to_save, or serve the merged model from 'gemma4-bridge merge' after "
                "merging those modules with PEFT's merge_and_unload",
            )  # fmt: skip
        if c.get("use_dora"):
            self.problem(
                "dora", "broken", f"{where}: use_dora=true; DoRA's delta is not scaling * B @ A and no server here loads it.",
                "merge it with PEFT's merge_and_unload and serve the merged model, or retrain with plain LoRA",
            )
        if str(c.get("bias", "none")) != "none" or c.get("lora_bias"):
            self.problem(
                "bias", "broken", f"{where}: bias={c.get('bias')!r} / lora_bias={c.get('lora_bias')!r}: trained biases are not LoRA weights servers load.",
                "retrain with bias='none' and lora_bias=false, or merge with PEFT and serve the merged model",
            )
        if isinstance(c.get("target_modules"), str):
            self.flavour("regex-target-modules")
            self.problem(
                "regex-target-modules", "fixable",
                f"{where}: target_modules is the pattern {c['target_modules']!r}; SGLang rejects patterns and other "
                "tools may expand them differently.",
                "gemma4-bridge convert writes the explicit module list",
            )  # fmt: skip

    def _resolve_keys(self) -> list[tuple[Resolution, tuple[int, ...], str]]:
        """Resolve every key; collect problems for keys that are not usable LoRA weights."""
        out: list[tuple[Resolution, tuple[int, ...], str]] = []
        seen: dict[str, str] = {}
        for key, (shape, dtype) in self.src.specs.items():
            parsed = parse_key(key)
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
            res = self._resolve(key)
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
        return out

    def _resolve(self, key: str) -> Resolution | None:
        """resolve_key against the base; without a base, the naming table alone (no site, no ``.linear``)."""
        if self.layout is not None:
            return resolve_key(key, self.layout)
        parsed = parse_key(key)
        if parsed is None:
            return None
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
        else:
            self.problem(
                "unknown-module", "broken",
                f"{self.label}: tensor {key} targets {res.parsed.module}, which the base model {self.layout.source} does not have "
                f"({reason}); the adapter was trained for another model (size).",
                "pass --base with the Gemma 4 checkpoint the adapter was trained on", (key,),
            )  # fmt: skip

    def _zero3(self, resolved: list[tuple[Resolution, tuple[int, ...], str]]) -> tuple[Zero3Checkpoint | None, dict[str, str]]:
        damaged = [r.parsed.key for r, shape, _ in resolved if 0 in shape]
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
            res = self._resolve(name)
            ckey = res.canonical_key if res is not None else None
            if ckey:
                by_canonical[ckey] = (name, shape)
        missing = [r.parsed.key for r, shape, _ in resolved if 0 in shape and r.canonical_key not in by_canonical]
        if missing:
            self.problem(
                "zero3-mismatch", "broken",
                f"{zero3.tag_dir}: the DeepSpeed checkpoint has no values for {len(missing)} damaged tensor(s) (e.g. {missing[0]}).",
                "pass --zero3-checkpoint with the checkpoint saved by the same training run", tuple(missing),
            )  # fmt: skip
        for res, _, _ in resolved:
            if res.canonical_key in by_canonical:
                names[res.canonical_key] = by_canonical[res.canonical_key][0]
        self.zero3_shapes = {k: v[1] for k, v in by_canonical.items()}
        self.problem(
            "zero-element", "fixable",
            f"{self.label}: {len(damaged)} tensor(s) have zero elements (ZeRO-3 saved them without gathering).",
            f"convert recovers them from {zero3.tag_dir} ({zero3.world_size} rank(s))", tuple(damaged),
        )  # fmt: skip
        self._check_zero3_step(resolved, zero3, names)
        return zero3, names

    def _check_zero3_step(self, resolved: list[tuple[Resolution, tuple[int, ...], str]], zero3: Zero3Checkpoint, names: dict[str, str]) -> None:
        """Intact tensors must equal the checkpoint's: else the checkpoint is from another step."""
        import torch

        for res, shape, dtype in resolved:
            if 0 in shape or res.canonical_key not in names:
                continue
            saved = self.src.get(res.parsed.key)
            recovered = zero3.recover(names[res.canonical_key]).to(saved.dtype)
            if recovered.shape != saved.shape or not torch.equal(recovered, saved):
                self.problem(
                    "zero3-mismatch", "broken",
                    f"{zero3.tag_dir}: tensor {res.parsed.key} differs between the adapter and the DeepSpeed checkpoint, "
                    "so the checkpoint is from another training step.",
                    "pass --zero3-checkpoint with the global_stepN directory saved at the same step as the adapter",
                    (res.parsed.key,),
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
            source_module = parse_key(a.source_key).module  # type: ignore[union-attr]
            r_cfg, alpha = effective_rank_alpha(self.config, source_module)
            rank = a.shape[0]
            if rank != r_cfg:
                self.problem(
                    "rank-mismatch", "broken",
                    f"{self.label}: tensor {a.source_key} has rank {rank} but adapter_config.json gives {source_module} r={r_cfg}; "
                    "the scaling alpha/r would be wrong.",
                    "fix r / rank_pattern in adapter_config.json to match the tensors", (a.source_key,),
                )  # fmt: skip
                continue
            site = sites[module]
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

    def _classify(self, resolved: list[tuple[Resolution, tuple[int, ...], str]], renamed: int) -> None:
        if self.is_pickle:
            self.flavour("pickle")
            self.problem("pickle", "fixable", f"{self.label}: pickle weights (loaded with weights_only=True).", "convert writes safetensors")
        if renamed:
            self.problem(
                "non-canonical-names", "fixable",
                f"{self.label}: {renamed} tensor name(s) are not in the canonical layout "
                f"(e.g. {next(r.parsed.key for r, _, _ in resolved if r.canonical_key != r.parsed.key)}).",
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

    def _canonical_config(self, modules: list[ModuleDelta]) -> dict[str, Any]:
        config = {k: v for k, v in self.config.items() if k not in SELECTION_FIELDS}
        r, alpha = int(self.config.get("r", 8)), float(self.config.get("lora_alpha", 8))
        config["target_modules"] = sorted(m.site.model_path for m in modules)
        config["rank_pattern"] = {m.site.model_path: m.rank for m in sorted(modules, key=lambda m: m.site.path) if m.rank != r}
        config["alpha_pattern"] = {
            m.site.model_path: _int_if_whole(m.alpha) for m in sorted(modules, key=lambda m: m.site.path) if m.alpha != alpha
        }
        config["modules_to_save"] = None
        config["peft_type"] = "LORA"
        config.setdefault("bias", "none")
        config.setdefault("use_rslora", False)
        config.setdefault("lora_alpha", _int_if_whole(alpha))
        return config

