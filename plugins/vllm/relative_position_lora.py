"""LoRA on the audio attention's ``relative_k_proj``, applied per audio item with that item's adapter.

Gemma 4's audio attention (transformers ``Gemma4AudioAttention``) projects one table of relative
position embeddings ``[1, P, hidden]`` with ``relative_k_proj``, multiplies every item's queries by
the result (``matrix_bd``) and realigns that with ``_rel_shift``. PEFT ``all-linear`` wraps the
linear, so an adapter changes the relative keys of the items that use it: items of one encoder call
with different adapters need different relative keys. vLLM's per-token LoRA kernels cannot express
that (P position rows, not the call's tokens: "einsum(): subscript b has size 25 ... 13").

Here the linear gets :class:`RelativePositionLinearWithLoRA`, vLLM's own ``ReplicatedLinearWithLoRA``
(the LoRA manager stores each adapter slot's factors in it, B already scaled) with another forward:
it returns the base keys followed by one block of keys per adapter slot of the current encoder call
(its items' slots are the tower mapping's ``prompt_mapping``, read from the layer's punica wrapper;
:class:`~.model.EncoderLoRASplit` narrows that mapping to each call). Upstream's forward runs
unchanged and multiplies the queries by every block; :class:`PerItemRelativeKeysAttention` only
overrides ``_rel_shift`` to keep, per item, the block of its own adapter (the base block for items
without one) before upstream's shift. Nothing of transformers' attention is copied, so its other
changes (e.g. the mask convention of 5.24) carry over.

Hook points, checked by :func:`verify_upstream` (tests/test_vllm_relative_k.py fails if they move):

* transformers ``Gemma4AudioAttention.forward``: the relative keys and ``matrix_bd`` flow exactly
  through :data:`FORWARD_FACTS` (checked line by line in its source; true in 5.19 and 5.24), and
  ``_rel_shift(x)`` realigns ``[batch, heads, blocks, chunk, P]``.
* vLLM: ``vllm.lora.utils.from_layer`` picks the first class of the module tuple
  ``_all_lora_classes`` whose ``can_replace_layer`` accepts the layer (this class is put first);
  ``BaseLinearLayerWithLoRA`` stacks factors as ``[slots, 1, rank, in]`` / ``[slots, 1, out, rank]``;
  ``PunicaWrapperBase.sampler_indices`` is each item's slot (-1: no adapter).

Where any of that does not hold, the linear stays vLLM's plain one
(:func:`~.model.unwrap_non_token_linears`) and adapters with LoRA there are refused by name.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

import torch
from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioAttention
from vllm.lora.layers import ReplicatedLinearWithLoRA

from gemma4_bridge.layout import NON_TOKEN_LINEARS, TOWERS

# Every line of Gemma4AudioAttention.forward that touches position_embeddings, the relative keys or
# matrix_bd, in order: the per-item keys change the row count of relative_key_states and the last
# dimension of matrix_bd, and nothing else may read them before _rel_shift.
FORWARD_FACTS: tuple[str, ...] = (
    "relative_key_states = self.relative_k_proj(position_embeddings)",
    "relative_key_states = relative_key_states.view(-1, self.num_heads, self.head_dim)",
    "relative_key_states = relative_key_states.to(dtype=query_states.dtype)",
    "matrix_bd = queries_flat @ relative_key_states.permute(1, 2, 0)",
    "matrix_bd = matrix_bd.reshape(batch_size, self.num_heads, num_blocks, self.chunk_size, -1)",
    "matrix_bd = self._rel_shift(matrix_bd)",
    "attn_weights = matrix_ac + matrix_bd",
)
TRACKED = ("position_embeddings", "relative_key_states", "matrix_bd")
# What the vLLM side relies on: (module, qualified name, parameters or None for a property).
VLLM_CONTRACT: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("vllm.lora.utils", "from_layer", ("layer", "max_loras", "lora_config", "packed_modules_list", "model_config")),
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.set_lora", ("self", "index", "lora_a", "lora_b")),
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.create_lora_weights", ("self", "max_loras", "lora_config")),
    ("vllm.lora.layers.base", "BaseLayerWithLoRA.set_mapping", ("self", "punica_wrapper")),
    ("vllm.lora.punica_wrapper.punica_base", "PunicaWrapperBase.sampler_indices", None),
)
# (module, qualified name, source line): the registry lookup and the stacked-factor layout.
VLLM_SOURCE_FACTS: tuple[tuple[str, str, str], ...] = (
    ("vllm.lora.utils", "from_layer", "for lora_cls in _all_lora_classes:"),
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.create_lora_weights", "self.lora_a_stacked = tuple("),
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.create_lora_weights", "self.lora_b_stacked = tuple("),
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.create_lora_weights", "max_loras,\n                1,"),
)
_MARK = "_gemma4_bridge_relative_positions"  # set on the relative_k_proj layers this module serves


def _resolve(module_name: str, qualname: str) -> Any:
    owner: Any = importlib.import_module(module_name)
    for part in qualname.split(".")[:-1]:
        owner = getattr(owner, part)
    return inspect.getattr_static(owner, qualname.split(".")[-1])


def forward_problems(forward: Any) -> list[str]:
    """How ``forward``'s source departs from :data:`FORWARD_FACTS` (empty: the per-item keys fit it)."""
    lines = [line.strip() for line in inspect.getsource(forward).splitlines()]
    tracked = [line for line in lines if any(name in line for name in TRACKED) and not line.startswith(("position_embeddings:", "#"))]
    if tuple(tracked) != FORWARD_FACTS:
        return [f"Gemma4AudioAttention.forward handles the relative keys differently ({len(tracked)} line(s) touch them; expected {list(FORWARD_FACTS)}, found {tracked})"]
    return []


def verify_upstream() -> list[str]:
    """What differs from the upstream code this module relies on (empty when all is well)."""
    import transformers

    problems = [f"transformers {transformers.__version__}: {p}" for p in forward_problems(Gemma4AudioAttention.forward)]
    if list(inspect.signature(Gemma4AudioAttention._rel_shift).parameters) != ["self", "x"]:
        problems.append(f"transformers {transformers.__version__}: Gemma4AudioAttention._rel_shift no longer takes (self, x)")
    for module_name, qualname, params in VLLM_CONTRACT:
        try:
            attr = _resolve(module_name, qualname)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{module_name}.{qualname} is gone ({exc})")
            continue
        if params is None:
            if not isinstance(attr, property):
                problems.append(f"{module_name}.{qualname} is no longer a property")
            continue
        found = tuple(inspect.signature(attr).parameters)
        if found[: len(params)] != params:
            problems.append(f"{module_name}.{qualname} takes {list(found)}, expected {list(params)} first")
    for module_name, qualname, line in VLLM_SOURCE_FACTS:
        try:
            if line not in inspect.getsource(_resolve(module_name, qualname)):
                problems.append(f"{module_name}.{qualname} no longer has {line!r}")
        except (ImportError, AttributeError, TypeError) as exc:
            problems.append(f"{module_name}.{qualname} is gone ({exc})")
    if not isinstance(getattr(importlib.import_module("vllm.lora.utils"), "_all_lora_classes", None), tuple):
        problems.append("vllm.lora.utils._all_lora_classes is no longer a tuple of LoRA layer classes")
    return problems


@functools.cache
def supported() -> bool:
    """Whether this install can serve ``relative_k_proj`` LoRA (same answer in front end and worker)."""
    return not verify_upstream()


def serves(site: Any) -> bool:
    """True for a LoRA site (a layout ``LinearSite``) that is not token-wise but is served here per audio item."""
    return site.component == TOWERS.get("audio") and NON_TOKEN_LINEARS.search(site.path) is not None and supported()


def install(audio_tower: torch.nn.Module | None) -> int:
    """Serve ``relative_k_proj`` LoRA per item in ``audio_tower`` (before vLLM builds its LoRA layers).

    Marks each audio attention's ``relative_k_proj`` for :class:`RelativePositionLinearWithLoRA`,
    registers that class with vLLM, and gives the attention the per-item ``_rel_shift``. Returns
    the number of attentions changed: 0 where unsupported (nothing is touched then)."""
    if audio_tower is None or not supported():
        return 0
    import vllm.lora.utils as lora_utils

    if RelativePositionLinearWithLoRA not in lora_utils._all_lora_classes:
        lora_utils._all_lora_classes = (RelativePositionLinearWithLoRA, *lora_utils._all_lora_classes)
    count = 0
    for module in audio_tower.modules():
        if type(module) is Gemma4AudioAttention:
            setattr(module.relative_k_proj, _MARK, True)
            module.__class__ = PerItemRelativeKeysAttention
            count += 1
    return count


class RelativePositionLinearWithLoRA(ReplicatedLinearWithLoRA):
    """vLLM's LoRA layer for the audio ``relative_k_proj``: same per-slot storage, per-item keys out."""

    def __init__(self, base_layer: Any) -> None:
        super().__init__(base_layer)
        # Set by forward, consumed by the attention's _rel_shift: the key block of each item and P.
        self.item_blocks: torch.Tensor | None = None
        self.positions = 0

    @classmethod
    def can_replace_layer(cls, source_layer: torch.nn.Module, lora_config: Any, packed_modules_list: list, model_config: Any = None) -> bool:
        return bool(getattr(source_layer, _MARK, False))

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        """``[1, P, out]`` base keys, then ``P`` rows per adapter slot of the call: ``keys + B_s A_s x``."""
        keys = self.base_layer(input_)
        self.item_blocks, self.positions = None, keys.shape[-2]
        slots = self._item_slots()
        if slots is None:
            return keys
        used = sorted(set(slots.tolist()) - {-1})
        index = torch.tensor(used, device=keys.device)
        lora_a = self.lora_a_stacked[0][index, 0]  # [slots used, rank, in]
        lora_b = self.lora_b_stacked[0][index, 0]  # [slots used, out, rank]
        positions = input_.reshape(1, -1, lora_a.shape[-1]).to(lora_a.dtype)
        adapted = keys.reshape(1, -1, keys.shape[-1]) + ((positions @ lora_a.transpose(1, 2)) @ lora_b.transpose(1, 2)).to(keys.dtype)
        block = {slot: i + 1 for i, slot in enumerate(used)}
        self.item_blocks = torch.tensor([block.get(s, 0) for s in slots.tolist()], device=keys.device)
        return torch.cat([keys.reshape(1, -1, keys.shape[-1]), adapted.reshape(1, -1, keys.shape[-1])], dim=1)

    def _item_slots(self) -> torch.Tensor | None:
        """Each item's adapter slot in this encoder call (-1: none), or None when no item gets a delta."""
        if not bool(self.lora_b_stacked[0].any()):
            return None  # no loaded adapter has LoRA here (also: start-up profiling runs)
        wrapper = getattr(self, "punica_wrapper", None)
        if wrapper is None or wrapper.indices_len[1] is None:
            raise RuntimeError("gemma4-bridge: the audio tower has no LoRA mapping for this encoder call")
        slots = wrapper.sampler_indices
        return None if bool((slots < 0).all()) else slots


class PerItemRelativeKeysAttention(Gemma4AudioAttention):
    """``Gemma4AudioAttention`` that keeps, per item, the relative-key block of its own adapter."""

    def _rel_shift(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.relative_k_proj
        blocks = getattr(proj, "item_blocks", None)
        if blocks is not None:
            proj.item_blocks = None
            if blocks.numel() != x.shape[0]:
                raise RuntimeError(
                    f"gemma4-bridge: the audio tower's LoRA mapping names {blocks.numel()} item(s) but this encoder "
                    f"call has {x.shape[0]}, so the relative_k_proj LoRA of each audio item cannot be chosen"
                )
            x = x.unflatten(-1, (-1, proj.positions))  # [batch, heads, blocks, chunk, key blocks, P]
            index = blocks.view(-1, 1, 1, 1, 1, 1).expand(-1, *x.shape[1:4], 1, x.shape[-1])
            x = x.gather(4, index).squeeze(4)
        return super()._rel_shift(x)
