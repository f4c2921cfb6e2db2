"""LoRA on the audio attention's ``relative_k_proj``, applied per audio item with that item's adapter.

Gemma 4's audio attention (transformers ``Gemma4AudioAttention``) projects one table of relative
position embeddings ``[1, P, hidden]`` with ``relative_k_proj`` and multiplies every item's queries
by the result (the ``matrix_bd`` term). PEFT ``all-linear`` wraps that linear, so an adapter changes
the relative keys of the items that use it: items of one encoder call with different adapters need
different relative keys. vLLM's per-token LoRA kernels cannot express that (P position rows, not the
call's tokens: "einsum(): subscript b has size 25 ... 13" on every audio prompt).

vLLM still builds its ordinary LoRA layer on the linear (``ReplicatedLinearWithLoRA``): the LoRA
manager stores each adapter slot's factors there (``set_lora``/``reset_lora``, B already scaled), and
the layer holds the audio tower's punica wrapper, whose ``sampler_indices`` are the adapter slots of
the current encoder call's items (the tower mapping's ``prompt_mapping``, narrowed to each call by
:class:`~.model.EncoderLoRASplit`). That layer's own per-token forward is never called: each audio
attention becomes a :class:`PerItemRelativeKeysAttention`, upstream's forward with relative keys of
shape ``[items, P, heads, head_dim]`` (base keys plus each item's own delta; none for items without an
adapter) instead of one shared ``[P, heads, head_dim]``.

Hook points, checked by :func:`verify_upstream` (tests/test_vllm_relative_k.py fails if they move):

* ``transformers...Gemma4AudioAttention.forward``: copied below with the per-item change; its source
  must be a version listed in ``UPSTREAM_FORWARD_SHA256``. Otherwise the audio tower keeps vLLM's
  plain linear there (:func:`~.model.unwrap_non_token_linears`) and such adapters are refused.
* ``vllm.lora.layers.BaseLinearLayerWithLoRA`` (``base_layer``, ``set_lora``, ``lora_a_stacked`` /
  ``lora_b_stacked`` of shape ``[slots, 1, rank, in]`` / ``[slots, 1, out, rank]``) and
  ``PunicaWrapperBase.sampler_indices``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812 (upstream's spelling, kept in the copied forward)
from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioAttention

# sha256 of inspect.getsource(Gemma4AudioAttention.forward) for the releases the copy below was
# checked against (line by line, and numerically by tests/test_vllm_relative_k.py).
UPSTREAM_FORWARD_SHA256: dict[str, str] = {
    "1e965c86a39c818b93b854635d8ea9f87f9b473a541d26cd312c2d34c6f84823": "transformers 5.19.0",
}
# What the vLLM side relies on: (module, qualified name, parameters or None for a property).
VLLM_CONTRACT: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.set_lora", ("self", "index", "lora_a", "lora_b")),
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.create_lora_weights", ("self", "max_loras", "lora_config")),
    ("vllm.lora.layers.base", "BaseLayerWithLoRA.set_mapping", ("self", "punica_wrapper")),
    ("vllm.lora.punica_wrapper.punica_base", "PunicaWrapperBase.sampler_indices", None),
)
# Source lines of create_lora_weights the stacked-factor layout [slots, 1, rank|out, in|rank] comes from.
STACKED_LAYOUT = ("self.lora_a_stacked = tuple(", "self.lora_b_stacked = tuple(", "max_loras,\n                1,")


def forward_source_digest() -> str:
    return hashlib.sha256(inspect.getsource(Gemma4AudioAttention.forward).encode()).hexdigest()


def verify_upstream() -> list[str]:
    """What differs from the upstream code this module relies on (empty when all is well)."""
    import importlib

    problems = []
    digest = forward_source_digest()
    if digest not in UPSTREAM_FORWARD_SHA256:
        import transformers

        problems.append(
            f"transformers {transformers.__version__}: Gemma4AudioAttention.forward is not a version the per-item "
            f"copy was checked against (source sha256 {digest[:12]}...; known: {', '.join(UPSTREAM_FORWARD_SHA256.values())})"
        )
    for module_name, qualname, params in VLLM_CONTRACT:
        try:
            owner: Any = importlib.import_module(module_name)
            for part in qualname.split(".")[:-1]:
                owner = getattr(owner, part)
            attr = inspect.getattr_static(owner, qualname.split(".")[-1])
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
    try:
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        source = inspect.getsource(BaseLinearLayerWithLoRA.create_lora_weights)
    except (ImportError, AttributeError) as exc:
        return [*problems, f"vllm BaseLinearLayerWithLoRA.create_lora_weights is gone ({exc})"]
    if not all(line in source for line in STACKED_LAYOUT):
        problems.append("vllm BaseLinearLayerWithLoRA.create_lora_weights no longer stacks factors as [slots, 1, ...]")
    return problems


@functools.cache
def supported() -> bool:
    """Whether this install can serve ``relative_k_proj`` LoRA (same answer in front end and worker)."""
    return not verify_upstream()


def serves(site: Any) -> bool:
    """True for a LoRA site (a layout ``LinearSite``) that is not token-wise but is served here per audio item."""
    return site.component == "audio_tower" and site.path.endswith(".self_attn.relative_k_proj") and supported()


def install(audio_tower: torch.nn.Module | None) -> int:
    """Make every audio attention of ``audio_tower`` compute relative keys per item; 0 if unsupported."""
    if audio_tower is None or not supported():
        return 0
    count = 0
    for module in audio_tower.modules():
        if type(module) is Gemma4AudioAttention:
            module.__class__ = PerItemRelativeKeysAttention
            count += 1
    return count


def item_slots(proj: Any, items: int) -> torch.Tensor | None:
    """The adapter slot of each of the call's ``items`` (-1: none), or None when no item gets a delta."""
    if not bool(proj.lora_b_stacked[0].any()):
        return None  # no loaded adapter has relative_k_proj LoRA here (also: start-up profiling runs)
    wrapper = getattr(proj, "punica_wrapper", None)
    slots = None if wrapper is None or wrapper.indices_len[1] is None else wrapper.sampler_indices
    if slots is None or slots.numel() != items:
        raise RuntimeError(
            f"gemma4-bridge: the audio tower's LoRA mapping names {None if slots is None else slots.numel()} item(s) "
            f"but this encoder call has {items}, so the relative_k_proj LoRA of each audio item cannot be chosen"
        )
    return None if bool((slots < 0).all()) else slots


def relative_keys(proj: torch.nn.Module, position_embeddings: torch.Tensor, items: int) -> torch.Tensor:
    """``relative_k_proj(position_embeddings)`` as ``[1, P, out]``, or ``[items, P, out]`` when the call's
    items carry different deltas: base keys plus ``B_s @ A_s`` of each item's slot ``s``, none for -1."""
    from vllm.lora.layers import BaseLayerWithLoRA

    if not isinstance(proj, BaseLayerWithLoRA):
        keys = proj(position_embeddings)
        return keys.reshape(1, -1, keys.shape[-1])
    keys = proj.base_layer(position_embeddings)
    keys = keys.reshape(1, -1, keys.shape[-1])
    slots = item_slots(proj, items)
    if slots is None:
        return keys
    index = slots.clamp(min=0)
    lora_a = proj.lora_a_stacked[0][index, 0]  # [items, rank, in]
    lora_b = proj.lora_b_stacked[0][index, 0]  # [items, out, rank]
    positions = position_embeddings.reshape(1, -1, lora_a.shape[-1]).to(lora_a.dtype)
    delta = (positions @ lora_a.transpose(1, 2)) @ lora_b.transpose(1, 2)
    delta = delta.masked_fill((slots < 0).view(-1, 1, 1), 0.0)
    return keys + delta.to(keys.dtype)


class PerItemRelativeKeysAttention(Gemma4AudioAttention):
    """``Gemma4AudioAttention`` whose relative keys may differ per item (see the module docstring)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor,
        attention_mask: torch.BoolTensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        # Upstream's forward (UPSTREAM_FORWARD_SHA256) except where marked "per item".
        batch_size, seq_length, _ = hidden_states.shape
        hidden_shape = (batch_size, seq_length, self.num_heads, self.head_dim)

        query_states = self.q_proj(hidden_states).float().view(hidden_shape)
        key_states = self.k_proj(hidden_states).float().view(hidden_shape)
        value_states = self.v_proj(hidden_states).float().view(hidden_shape)

        query_states = query_states * self.q_scale * F.softplus(self.per_dim_scale)
        key_states = key_states * self.k_scale

        query_states = self._convert_to_block(query_states)
        key_states = self._extract_block_context(key_states)
        value_states = self._extract_block_context(value_states)
        num_blocks = query_states.shape[1]

        # per item: [1 or batch_size, P, heads, head_dim] instead of [P, heads, head_dim]
        relative_key_states = relative_keys(self.relative_k_proj, position_embeddings, batch_size)
        relative_key_states = relative_key_states.view(relative_key_states.shape[0], -1, self.num_heads, self.head_dim)
        relative_key_states = relative_key_states.to(dtype=query_states.dtype)

        queries = query_states.permute(0, 3, 1, 2, 4)
        matrix_ac = queries @ key_states.permute(0, 3, 1, 4, 2)

        queries_flat = queries.reshape(batch_size, self.num_heads, -1, self.head_dim)
        matrix_bd = queries_flat @ relative_key_states.permute(0, 2, 3, 1)  # per item: [1|batch, heads, head_dim, P]
        matrix_bd = matrix_bd.reshape(batch_size, self.num_heads, num_blocks, self.chunk_size, -1)
        matrix_bd = self._rel_shift(matrix_bd)

        attn_weights = matrix_ac + matrix_bd
        attn_weights = attn_weights / self.softcap
        attn_weights = torch.tanh(attn_weights)
        attn_weights = attn_weights * self.softcap

        if attention_mask is not None:
            attn_weights = attn_weights.masked_fill(
                attention_mask.logical_not(), self.config.attention_invalid_logits_value
            )

        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(value_states.dtype)
        attn_output = attn_weights @ value_states.permute(0, 3, 1, 2, 4)
        attn_output = attn_output.permute(0, 2, 3, 1, 4).reshape(batch_size, num_blocks * self.chunk_size, -1)
        attn_output = attn_output[:, :seq_length].contiguous()
        attn_output = self.post(attn_output.to(hidden_states.dtype))

        return attn_output, attn_weights
