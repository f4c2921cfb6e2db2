"""LoRA buffer sizes for SGLang's stacked Gemma 4 modules, per layer, from the layout model.

SGLang sizes one LoRA buffer per (module, layer) by asking the model ``get_hidden_dim``. The
built-in Gemma 4 class answers from the top-level config (which has no such sizes) and with one
size for every layer, but Gemma 4 layers differ: sliding and full attention have different head
sizes (and K/V head counts), KV-shared layers have no k_proj/v_proj yet SGLang's fused
``qkv_proj`` still has K/V columns there, and ``use_double_wide_mlp`` doubles the MLP of the
KV-shared layers. The sizes here are the real weight shapes, read from the checkpoint headers.
"""

from __future__ import annotations

from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import Gemma4Layout, LinearSite, text_layer_path

# SGLang's fused modules and the transformers linears stacked (in this order) along the output.
STACKED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
PARENT: dict[str, str] = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def text_site(layout: Gemma4Layout, layer: int, leaf: str) -> LinearSite | None:
    return layout.site(text_layer_path(layer, f"{PARENT[leaf]}.{leaf}"))


def slice_out_features(layout: Gemma4Layout, layer: int, leaf: str) -> int:
    """Output width of one slice of a fused SGLang module on ``layer``.

    K and V are sized from the layer's attention (head_dim x K/V heads), not from k_proj/v_proj,
    which KV-shared layers lack (and k_eq_v layers lack v_proj): SGLang keeps those columns.
    """
    text_layer = layout.text_layers[layer]
    if leaf in ("k_proj", "v_proj"):
        kv_width = text_layer.head_dim * text_layer.num_kv_heads
        site = text_site(layout, layer, leaf)
        if site is not None and site.out_features != kv_width:
            raise BridgeError(
                f"{layout.source}: layer {layer} {leaf} has {site.out_features} outputs but its attention "
                f"has {text_layer.num_kv_heads} K/V heads of size {text_layer.head_dim}.",
                fix="the checkpoint does not match its config.json; re-download the model",
            )
        return kv_width
    return _require(layout, layer, leaf).out_features


def lora_dims(layout: Gemma4Layout, module_name: str, layer: int) -> tuple[int, int]:
    """(input, output) size of SGLang LoRA module ``module_name`` on text layer ``layer``."""
    if module_name in STACKED:
        first = _require(layout, layer, STACKED[module_name][0])
        return first.in_features, sum(slice_out_features(layout, layer, leaf) for leaf in STACKED[module_name])
    if module_name in ("o_proj", "down_proj"):
        site = _require(layout, layer, module_name)
        return site.in_features, site.out_features
    if module_name == "embed_tokens":
        return layout.vocab_size, layout.hidden_size
    if module_name == "lm_head":
        return layout.hidden_size, layout.vocab_size
    raise BridgeError(
        f"SGLang asked for LoRA sizes of '{module_name}', which Gemma 4 LoRA in SGLang does not support.",
        fix="serve with --lora-target-modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj "
        "(or leave it out: it is inferred from the adapters)",
    )


def _require(layout: Gemma4Layout, layer: int, leaf: str) -> LinearSite:
    site = text_site(layout, layer, leaf)
    if site is None:
        raise BridgeError(
            f"{layout.source}: text layer {layer} has no {PARENT[leaf]}.{leaf} weight.",
            fix="the checkpoint is incomplete or not a Gemma 4 model; re-download it",
        )
    return site
