"""What a Gemma 4 checkpoint is made of, read from ``config.json`` and safetensors headers only.

This is the single source of truth about Gemma 4 structure for the converters, the serving plugins
and the training wrapper: text layers and their attention kind, which layers store and which reuse
K/V (KV-shared layers have no k_proj/v_proj), which layers compute V from k_proj (``k_eq_v``), the
towers present, their ``Gemma4ClippableLinear`` sites, and every LoRA-able linear with its shape.
No tensor data is read, so a 30 GB checkpoint is described in milliseconds.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from gemma4_bridge.errors import BridgeError, StrEnum
from gemma4_bridge.safetensors_header import read_safetensors_header  # the one strict header validator

AttentionKind = Literal["sliding", "full"]
KVRole = Literal["own", "store", "reuse"]
Component = str  # a ComponentSpec.name: "language_model", "vision_tower", "embed_audio", ...
ComponentKind = Literal["language_model", "tower", "connector"]


@dataclass(frozen=True)
class ComponentSpec:
    """One part of a Gemma 4 checkpoint, as every tool here names and treats it.

    A new family member's part (MoE experts, an encoder-free embedder) is one more row of
    :data:`COMPONENTS`; nothing else restates these facts.
    """

    name: str  # "vision_tower": the attribute of transformers' Gemma4Model
    kind: ComponentKind
    modality: str | None  # "vision" / "audio" (the ``<modality>_config`` of config.json); None for text
    prefix: str  # checkpoint (= transformers, = PEFT) prefix: "model.vision_tower."
    vllm_prefix: str  # the same module in vLLM's naming: "vision_tower.", "language_model.model."
    # Encoder-call inputs (vLLM ``embed_multimodal`` kwargs) that hold one entry per item, with
    # the item's modality: they identify which items an encoder call runs.
    item_keys: tuple[tuple[str, str], ...] = ()
    # Prompt modalities that feed it: with all of them limited to 0 items vLLM builds no LoRA layers here.
    inputs: tuple[str, ...] = ()
    # Its prefix in a text-only ``Gemma4ForCausalLM`` checkpoint (``model.layers.N``), if it exists there.
    text_only_prefix: str | None = None

    @property
    def is_language_model(self) -> bool:
        return self.kind == "language_model"


COMPONENTS: tuple[ComponentSpec, ...] = (
    ComponentSpec("language_model", "language_model", None, "model.language_model.", "language_model.model.", text_only_prefix="model."),
    ComponentSpec("vision_tower", "tower", "vision", "model.vision_tower.", "vision_tower.",
                  item_keys=(("pixel_values", "image"), ("video_frame_counts", "video")), inputs=("image", "video")),
    ComponentSpec("audio_tower", "tower", "audio", "model.audio_tower.", "audio_tower.",
                  item_keys=(("input_features_padded", "audio"),), inputs=("audio",)),
    ComponentSpec("embed_vision", "connector", "vision", "model.embed_vision.", "embed_vision.", inputs=("image", "video")),
    ComponentSpec("embed_audio", "connector", "audio", "model.embed_audio.", "embed_audio.", inputs=("audio",)),
)  # fmt: skip
COMPONENT_BY_NAME: dict[str, ComponentSpec] = {c.name: c for c in COMPONENTS}
LANGUAGE_MODEL: str = next(c.name for c in COMPONENTS if c.is_language_model)
# Everything that is not the language model: vLLM serves their LoRA only with --enable-tower-connector-lora.
NON_LANGUAGE: tuple[str, ...] = tuple(c.name for c in COMPONENTS if not c.is_language_model)
# Checkpoint prefixes of each component, in the transformers (= PEFT) naming.
COMPONENT_PREFIXES: dict[str, str] = {c.name: c.prefix for c in COMPONENTS}
# modality -> its tower (the components that exist only when ``<modality>_config`` does).
TOWERS: dict[str, str] = {c.modality: c.name for c in COMPONENTS if c.kind == "tower" and c.modality}
# Encoder-call input key -> item modality (see ComponentSpec.item_keys).
ENCODER_ITEM_KEYS: dict[str, str] = {key: modality for c in COMPONENTS for key, modality in c.item_keys}


def text_layer_path(index: int, rest: str) -> str:
    """A module path inside text layer ``index`` (checkpoint naming): ``rest`` is e.g. ``self_attn.q_proj``."""
    return f"{COMPONENT_PREFIXES[LANGUAGE_MODEL]}layers.{index}.{rest}"


# 2-D weights that are lookup tables, not linears.
NON_LINEAR_WEIGHTS = re.compile(r"(embed_tokens|embed_tokens_per_layer|position_embedding_table)\.weight$")
# Gemma 4's output projection, tied to the text embedding table (tie_word_embeddings): no tensor of its
# own in a checkpoint, and a LoRA on it (PEFT then also saves the whole table) is not a linear's delta.
TIED_OUTPUT = "lm_head"
SAVED_EMBEDDING_TABLE = re.compile(rf"(^|\.)({TIED_OUTPUT}|embed_tokens)(\.base_layer)?\.weight$")


def is_tied_output(module_path: str) -> bool:
    """Whether ``module_path`` names the tied output projection (``lm_head``, under any prefix)."""
    return module_path.rpartition(".")[2] == TIED_OUTPUT

# Linears that do not act on the token stream: a LoRA there changes positional terms, not tokens.
NON_TOKEN_LINEARS = re.compile(r"\.self_attn\.relative_k_proj$")
_TEXT_LAYER = re.compile(rf"^{re.escape(COMPONENT_PREFIXES[LANGUAGE_MODEL])}layers\.(\d+)\.")


class Absence(StrEnum):
    """Why an adapter module names no linear of the base (see :meth:`Gemma4Layout.missing_site_reason`)."""

    KV_SHARED = "kv-shared"  # k_proj/v_proj of a layer that reuses another layer's K/V
    K_EQ_V = "k-eq-v"  # v_proj of an attention_k_eq_v layer (V is the k_proj output)
    NO_TOWER = "no-tower"  # a tower or connector the base model does not have
    UNKNOWN_MODULE = "unknown-module"  # any other path: the adapter is for another model


@dataclass(frozen=True)
class Reason:
    """A decision's code (what code acts on) and its sentence (what a user reads)."""

    code: Absence
    message: str

    def __str__(self) -> str:
        return self.message
# Checkpoint tensor names that differ from the transformers module names (= PEFT key names), per
# model_type: the renames transformers applies on load (conversion_mapping.py). First match wins.
CHECKPOINT_RENAMES: dict[str, tuple[tuple[re.Pattern[str], str], ...]] = {
    "gemma4_unified": (  # 12B Unified: encoder-free embedders saved under their original names
        (re.compile(r"^model\.embed_vision\.embedding_projection\."), "model.embed_vision.multimodal_embedder.embedding_projection."),
        (re.compile(r"^model\.vision_embedder\."), "model.embed_vision."),
    ),
}
# MoE layers (26B-A4B): experts are 3-D parameters [num_experts, out, in] of ``Gemma4TextExperts``.
EXPERT_PARAM = re.compile(rf"^({re.escape(COMPONENT_PREFIXES[LANGUAGE_MODEL])}layers\.\d+\.experts)\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class LinearSite:
    """One ``nn.Linear`` that can receive a LoRA delta, named as in the transformers model."""

    path: str
    in_features: int
    out_features: int
    component: Component
    clippable: bool  # the Linear is ``Gemma4ClippableLinear.linear``: its delta must act inside the clamp
    token_wise: bool = True
    has_bias: bool = False
    # The module's name in the base's own model class, where adapter keys and target_modules must
    # point: ``path`` itself, except in a text-only ``Gemma4ForCausalLM`` (``model.layers.N...``).
    model_path: str = ""
    # Where its weight is stored in the checkpoint (``<checkpoint_path>.weight``): ``model_path``
    # except where the checkpoint keeps older names (12B Unified's ``model.vision_embedder...``).
    checkpoint_path: str = ""

    def __post_init__(self) -> None:
        if not self.model_path:
            object.__setattr__(self, "model_path", self.path)
        if not self.checkpoint_path:
            object.__setattr__(self, "checkpoint_path", self.model_path)

    @property
    def wrapper_path(self) -> str:
        """The ``Gemma4ClippableLinear`` module for a clippable site, else the Linear itself."""
        return self.path.removesuffix(".linear") if self.clippable else self.path

    @property
    def leaf(self) -> str:
        """PEFT-style target name (``q_proj``, ``ffw_layer_1``), the wrapper's name for tower sites."""
        return self.wrapper_path.rsplit(".", 1)[-1]

    @property
    def text_layer(self) -> int | None:
        m = _TEXT_LAYER.match(self.path)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ExpertSite:
    """One 3-D expert parameter of a MoE layer, ``[num_experts, out_features, in_features]``.

    Not a linear: PEFT reaches it with ``target_parameters`` (one ParamWrapper per parameter, the
    delta of all experts in one factor pair), and vLLM's fused-MoE kernels, not its LoRA linears, run it.
    """

    path: str  # model.language_model.layers.N.experts.gate_up_proj (transformers naming)
    num_experts: int
    out_features: int
    in_features: int
    model_path: str = ""  # in the base's own class (text-only Gemma4ForCausalLM: model.layers.N...)
    component: Component = "language_model"

    def __post_init__(self) -> None:
        if not self.model_path:
            object.__setattr__(self, "model_path", self.path)

    @property
    def param(self) -> str:
        """``gate_up_proj`` or ``down_proj``."""
        return self.path.rsplit(".", 1)[-1]

    @property
    def module(self) -> str:
        """The ``experts`` module (transformers naming) holding the parameter."""
        return self.path.rsplit(".", 1)[0]

    @property
    def text_layer(self) -> int | None:
        m = _TEXT_LAYER.match(self.path)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TextLayer:
    """A decoder layer of the language model and how its attention gets K and V."""

    index: int
    attention: AttentionKind
    head_dim: int
    num_kv_heads: int
    kv_role: KVRole  # "reuse": K/V come from the last "store" layer of the same attention kind
    k_eq_v: bool  # V is the k_proj output (full attention with attention_k_eq_v): no v_proj
    kv_source: int | None = None  # for "reuse" layers, the layer whose K/V they read

    @property
    def has_k_proj(self) -> bool:
        return self.kv_role != "reuse"

    @property
    def has_v_proj(self) -> bool:
        return self.kv_role != "reuse" and not self.k_eq_v

    @property
    def v_is_k_proj(self) -> bool:
        """V is this layer's own k_proj output, so a k_proj LoRA changes V as well (transformers)."""
        return self.k_eq_v and self.has_k_proj


@dataclass(frozen=True)
class Gemma4Layout:
    """The structure of one Gemma 4 checkpoint. Build with :meth:`from_model_dir`."""

    text_layers: tuple[TextLayer, ...]
    towers: tuple[str, ...]
    linears: Mapping[str, LinearSite]
    clippable_sites: tuple[str, ...]
    hidden_size: int
    vocab_size: int
    source: str = ""
    config: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # MoE layers' 3-D expert parameters by path (empty for dense members).
    experts: Mapping[str, ExpertSite] = field(default_factory=dict)

    # -- derived facts, named as Gemma 4 names them ------------------------------------------
    @cached_property
    def kv_shared_layers(self) -> tuple[int, ...]:
        """Layers that reuse another layer's K/V and have no k_proj/v_proj of their own."""
        return tuple(layer.index for layer in self.text_layers if layer.kv_role == "reuse")

    @cached_property
    def kv_store_layers(self) -> tuple[int, ...]:
        """Layers whose K/V the KV-shared layers read (their k/v LoRA reaches those layers too)."""
        return tuple(layer.index for layer in self.text_layers if layer.kv_role == "store")

    @cached_property
    def k_eq_v_layers(self) -> tuple[int, ...]:
        """Layers whose V is the k_proj output: a k_proj LoRA there changes V as well."""
        return tuple(layer.index for layer in self.text_layers if layer.v_is_k_proj)

    @property
    def quantization(self) -> str | None:
        """The checkpoint's quantization method (config ``quantization_config.quant_method``), if any."""
        quant = self.config.get("quantization_config") or {}
        return str(quant.get("quant_method") or "unknown") if quant else None

    @property
    def packed_linears(self) -> bool:
        """A quantized checkpoint whose linears have no ``.weight`` of their shape (GPTQ/AWQ ``qweight``,
        packed compressed-tensors): its linears cannot be read, so no adapter can be checked against it."""
        return self.quantization is not None and text_layer_path(0, "self_attn.q_proj") not in self.linears  # every member has it

    def site(self, path: str) -> LinearSite | None:
        return self.linears.get(path)

    def v_path_fed_by(self, site: LinearSite) -> str | None:
        """The V module (base's own naming) whose delta is ``site``'s when ``site`` is the k_proj of
        an attention_k_eq_v layer: servers that keep a separate V slice must give it k_proj's LoRA."""
        layer = site.text_layer
        if layer is None or not site.path.endswith(".self_attn.k_proj") or not self.text_layers[layer].v_is_k_proj:
            return None
        return site.model_path.removesuffix("k_proj") + "v_proj"

    def experts_of(self, module: str) -> list[ExpertSite]:
        """The expert parameters of one ``experts`` module, in registration order (gate_up, down)."""
        order = {"gate_up_proj": 0, "down_proj": 1}
        return sorted((s for s in self.experts.values() if s.module == module), key=lambda s: order[s.param])

    def missing_site_reason(self, path: str) -> Reason:
        """Why ``path`` names no linear of this base (a Gemma 4 adapter may still carry it)."""
        m = _TEXT_LAYER.match(path)
        leaf = path.rsplit(".", 1)[-1]
        index = int(m.group(1)) if m else -1
        if leaf in ("k_proj", "v_proj") and path == text_layer_path(index, f"self_attn.{leaf}") and index < len(self.text_layers):
            layer = self.text_layers[index]
            if layer.kv_role == "reuse":
                return Reason(
                    Absence.KV_SHARED,
                    f"layer {layer.index} is KV-shared (it reuses layer {layer.kv_source}'s K/V) and has no "
                    f"{leaf}; such tensors come from training on transformers 5.5.0/5.5.1",
                )
            if leaf == "v_proj" and layer.k_eq_v:
                return Reason(Absence.K_EQ_V, f"layer {layer.index} uses attention_k_eq_v (V is the k_proj output) and has no v_proj")
        for spec in COMPONENTS:
            if spec.kind == "tower" and path.startswith(spec.prefix) and spec.modality not in self.towers:
                return Reason(Absence.NO_TOWER, f"the base model has no {spec.modality} tower")
        return Reason(Absence.UNKNOWN_MODULE, f"the base model has no linear module {path}")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Gemma4Layout:
        """Read ``config.json`` and the safetensors headers of a Gemma 4 model directory."""
        root = Path(model_dir)
        config_path = root / "config.json"
        if not config_path.is_file():
            raise BridgeError(
                f"{root}: no config.json, so this is not a model directory.",
                fix="pass the directory that holds the base model's config.json and *.safetensors",
            )
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise BridgeError(f"{config_path}: not valid JSON ({exc}).", fix="restore the file from the model") from exc
        _require_gemma4(config, str(root))
        return cls.from_config(config, read_weight_shapes(root), source=str(root))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], source: str = "") -> Gemma4Layout:
        """Derive the layout from a config dict and a {tensor name: shape} map (checkpoint naming)."""
        text_config = config.get("text_config") or config
        model_type = _require_gemma4(config, source)
        shapes = _to_multimodal_names(shapes) if model_type == "gemma4_text" else dict(shapes)
        stored = _to_module_names(shapes, CHECKPOINT_RENAMES.get(model_type, ()))  # module name -> checkpoint name
        shapes = {module_name: shapes[name] for module_name, name in stored.items()}
        text_layers = tuple(_text_layers(text_config))
        towers = tuple(t for t, c in TOWERS.items() if config.get(f"{t}_config") and _has_prefix(shapes, c))
        linears: dict[str, LinearSite] = {}
        experts: dict[str, ExpertSite] = {}
        clippable: list[str] = []
        for name, shape in sorted(shapes.items()):
            if len(shape) == 3 and EXPERT_PARAM.match(name):
                experts[name] = ExpertSite(
                    name, int(shape[0]), int(shape[1]), int(shape[2]),
                    model_path=_causal_lm_name(name) if model_type == "gemma4_text" else name,
                )  # fmt: skip
                continue
            if not name.endswith(".weight") or len(shape) != 2 or NON_LINEAR_WEIGHTS.search(name):
                continue
            component = _component_of(name)
            if component is None:
                continue  # lm_head and anything outside the model proper
            path = name.removesuffix(".weight")
            layer_match = _TEXT_LAYER.match(path)
            if layer_match and re.search(r"\.self_attn\.(k_proj|v_proj)$", path):
                layer = text_layers[int(layer_match.group(1))]
                if (path.endswith("k_proj") and not layer.has_k_proj) or (path.endswith("v_proj") and not layer.has_v_proj):
                    continue  # stale tensor the model ignores on load (KV-shared / k_eq_v layer)
            is_clippable = path.endswith(".linear") and f"{path.removesuffix('.linear')}.input_min" in shapes
            if is_clippable:
                clippable.append(path.removesuffix(".linear"))
            linears[path] = LinearSite(
                path=path,
                in_features=int(shape[1]),
                out_features=int(shape[0]),
                component=component,
                clippable=is_clippable,
                token_wise=not NON_TOKEN_LINEARS.search(path),
                has_bias=f"{path}.bias" in shapes,
                model_path=_causal_lm_name(path) if model_type == "gemma4_text" else path,
                checkpoint_path=stored[name].removesuffix(".weight") if stored[name] != name else "",
            )
        return cls(
            text_layers=text_layers,
            towers=towers,
            linears=linears,
            clippable_sites=tuple(clippable),
            hidden_size=int(text_config["hidden_size"]),
            vocab_size=int(text_config["vocab_size"]),
            source=source,
            config=dict(config),
            experts=experts,
        )


def _require_gemma4(config: Mapping[str, Any], source: str) -> str:
    model_type = str(config.get("model_type", ""))
    if not model_type.startswith("gemma4"):
        raise BridgeError(
            f"{source or 'config'}: model_type is {model_type!r}, not a Gemma 4 model.",
            fix="gemma4-bridge only handles Gemma 4 checkpoints (model_type 'gemma4' or 'gemma4_text')",
        )
    return model_type


def _text_layers(text_config: Mapping[str, Any]) -> Iterable[TextLayer]:
    """Mirror transformers' Gemma4TextAttention: who stores K/V, who reuses it, who has k_eq_v."""
    num_layers = int(text_config["num_hidden_layers"])
    layer_types = list(text_config.get("layer_types") or [])
    if len(layer_types) != num_layers:
        raise BridgeError(
            f"config: text_config.layer_types has {len(layer_types)} entries for {num_layers} layers.",
            fix="the base model's config.json is inconsistent; re-download it",
        )
    num_shared = int(text_config.get("num_kv_shared_layers") or 0)
    first_shared = num_layers - num_shared
    k_eq_v = bool(text_config.get("attention_k_eq_v"))
    per_layer = {int(k): v for k, v in (text_config.get("per_layer_config") or {}).items()}
    base_kv_heads = int(text_config.get("num_key_value_heads") or 1)
    base_head_dim = int(text_config.get("head_dim") or 0)
    prev = layer_types[:first_shared]
    store = {kind: len(prev) - 1 - prev[::-1].index(kind) for kind in set(layer_types) if kind in prev}
    for i, kind in enumerate(layer_types):
        attention: AttentionKind = "sliding" if kind == "sliding_attention" else "full"
        reuse = num_shared > 0 and i >= first_shared
        role: KVRole = "reuse" if reuse else ("store" if num_shared > 0 and store.get(kind) == i else "own")
        overrides = per_layer.get(i, {})
        yield TextLayer(
            index=i,
            attention=attention,
            head_dim=int(overrides.get("head_dim", base_head_dim)),
            num_kv_heads=int(overrides.get("num_key_value_heads", base_kv_heads)),
            kv_role=role,
            k_eq_v=k_eq_v and attention == "full",
            kv_source=store.get(kind) if reuse else None,
        )


def _component_of(name: str) -> Component | None:
    for component, prefix in COMPONENT_PREFIXES.items():
        if name.startswith(prefix):
            return component
    return None


def _has_prefix(shapes: Mapping[str, Any], component: Component) -> bool:
    prefix = COMPONENT_PREFIXES[component]
    return any(name.startswith(prefix) for name in shapes)


def _to_multimodal_names(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A text-only ``Gemma4ForCausalLM`` checkpoint names layers ``model.layers.N``; use one naming."""
    spec = COMPONENT_BY_NAME[LANGUAGE_MODEL]
    old = re.compile("^" + re.escape(spec.text_only_prefix or ""))
    return {old.sub(spec.prefix, k): v for k, v in shapes.items()}


def _to_module_names(shapes: Mapping[str, Any], renames: tuple[tuple[re.Pattern[str], str], ...]) -> dict[str, str]:
    """{transformers module-tree name: checkpoint name} for every tensor (identity without renames)."""
    out: dict[str, str] = {}
    for name in shapes:
        module_name = name
        for pattern, replacement in renames:
            if pattern.match(name):
                module_name = pattern.sub(replacement, name, count=1)
                break
        out[module_name] = name
    return out


def _causal_lm_name(path: str) -> str:
    """Back from the one naming to the text-only checkpoint's own (inverse of _to_multimodal_names)."""
    spec = COMPONENT_BY_NAME[LANGUAGE_MODEL]
    return spec.text_only_prefix + path.removeprefix(spec.prefix) if path.startswith(spec.prefix) and spec.text_only_prefix else path


# bitsandbytes 4-bit stores a linear's weight packed ([out * in / 2, 1] uint8) and its logical shape in
# a small JSON tensor beside it (bitsandbytes.utils.pack_dict_to_tensor).
BNB_4BIT_STATE = re.compile(r"^(?P<weight>.+\.weight)\.quant_state\.bitsandbytes__(nf4|fp4)$")
_MAX_QUANT_STATE_BYTES = 4096


def read_weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: logical shape} for all safetensors files of a model directory, from headers only
    (and, for bitsandbytes 4-bit weights, the few bytes of JSON that hold their logical shape)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BridgeError(
            f"{model_dir}: no *.safetensors files.",
            fix="gemma4-bridge reads base models in safetensors format; convert .bin checkpoints first",
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        header = read_safetensors_header(file)
        states: dict[str, tuple[str, Mapping[str, Any]]] = {}  # 4-bit weight -> (its quant state tensor, header entry)
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
                if (m := BNB_4BIT_STATE.match(name)) is not None:
                    states[m.group("weight")] = (name, info)
        if states:
            shapes.update(_bnb_4bit_shapes(file, states))
    return shapes


def _bnb_4bit_shapes(file: Path, states: Mapping[str, tuple[str, Mapping[str, Any]]]) -> dict[str, tuple[int, ...]]:
    """The logical shape of each bitsandbytes 4-bit weight, from its quant state's JSON (one open per file)."""
    out: dict[str, tuple[int, ...]] = {}
    with file.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))  # the header was validated: the data start at 8 + n
        for weight, (name, info) in states.items():
            start, end = info["data_offsets"]
            try:
                if end - start > _MAX_QUANT_STATE_BYTES:
                    raise ValueError(f"{end - start} bytes")
                f.seek(8 + n + start)
                out[weight] = tuple(int(d) for d in json.loads(f.read(end - start).decode("utf-8"))["shape"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise BridgeError(
                    f"{file}: tensor {name} (a bitsandbytes 4-bit quant state) does not hold the weight's shape ({exc}).",
                    fix="pass the unquantized checkpoint the quantized one was made from",
                ) from exc
    return out
