"""GPU check of the training wrapper (gemma4_bridge.train) on an E2B-shaped random Gemma 4.

The CPU tests prove the wrapper's properties on a ~350k-parameter model; this script proves the same
properties at Gemma 4 E2B's real widths on a GPU, where kernels, dtypes and memory differ. It builds
a random ``Gemma4ForConditionalGeneration`` in memory (no download, no files written): text at E2B
widths (hidden 1536, MLP 6144 / 12288 double-wide on KV-shared layers, 8 heads, 1 KV head, head dims
256 sliding / 512 full, per-layer inputs 256) with fewer layers (default 10, the last 4 KV-shared),
``attention_k_eq_v`` on, vocab shrunk to 4096; a vision tower and an audio tower at E2B's own sizes
(vision 768 x 16 layers, audio conformer 1024 x 12 layers), ``use_clipped_linears`` with finite clip
bounds so a lost clamp changes outputs. About 1.0 B parameters.

Checks, one line each (``PASS|FAIL|INFO name: measured (bound)``); exit status 1 if any FAIL:

a. stock PEFT refuses ``target_modules=[q,k,v,o,gate,up,down]_proj`` on the multimodal model, and
   ``prepare_model`` + ``lora_config`` + ``get_peft_model`` wraps every resolved target, towers inside
   their clamps;
b. at init (LoRA B = 0) the PEFT model's logits equal the base model's bit for bit, on a batch with
   an image and an audio clip per row (float32 and bfloat16);
c. with random LoRA A and B, ``merge_and_unload`` (on a copy) agrees with the unmerged model at every
   LoRA site (the merged module fed the unmerged run's input; towers at the clamped wrapper); the
   end-to-end logits difference is reported (a random model this deep amplifies rounding);
d. gradients under reentrant gradient checkpointing after ``prepare_model`` (the guard switches it to
   non-reentrant and warns) equal those without checkpointing; the control without the wrapper shows
   the KV-sharing bug on the K/V-storing layers' k_proj/v_proj LoRA. The vision tower's LoRA grads are
   checked apart: its encoder layers run before the text decoder, outside the guard's reach;
e. step time (forward + backward + AdamW) with the wrapper vs plain PEFT on the same targets,
   interleaved, medians; the ratio is informational on CPU;
f. peak memory.

On the GPU box (the repo need not be installed; trl, deepspeed and vllm are not needed)::

    python examples/train_gpu_check.py               # ~1-2 min on an H200, float32 + bfloat16
    python examples/train_gpu_check.py --quick       # fewer timed steps, a smaller image

CPU smoke run of the same checks on a small model (under 2 minutes)::

    OMP_NUM_THREADS=1 python examples/train_gpu_check.py --device cpu --layers 5 --small
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_THREADS_SET_BY_USER = "OMP_NUM_THREADS" in os.environ
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the project's CPU boxes are shared and slow down 50x otherwise

import torch  # noqa: E402

try:
    import gemma4_bridge  # noqa: F401
except ImportError:  # run from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 8, 16
# Random LoRA factors of this std give a delta (scaling * B @ A) of ~10% of the weights' std (0.02)
# per element at r=8, alpha=16, at any width: it moves logits clearly without swamping the base.
LORA_STD = 0.02
FP32_MERGE_BOUND = 1e-5
# bfloat16 merging rounds W + delta to bfloat16: per site that costs ~2^-8 relative.
BF16_MERGE_BOUND = 2e-2
GRAD_BOUND = 1e-4
CONTROL_MIN_ERROR = 0.05  # the bug measured 0.4-0.7 on E2B (field notes); anything above noise shows it
STEP_RATIO_GOAL = 1.02


# -- model ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """Model and input sizes: E2B's widths, or small ones for a CPU smoke run."""

    text: dict[str, Any]
    vision: dict[str, Any]
    audio: dict[str, Any]
    image_grid: tuple[int, int]  # patches (rows, columns) of the real image; the rest is padding
    max_soft_tokens: int  # image budget: pixel_values carry max_soft_tokens * pooling^2 patches
    audio_frames: int  # mel frames per clip (10 ms each)
    text_tokens: int  # plain text tokens per row, split around the image and the clip


def e2b_shape(quick: bool) -> Shape:
    """E2B's text widths with fewer layers; E2B's own vision and audio towers (the transformers defaults)."""
    return Shape(
        text=dict(
            hidden_size=1536, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=1,
            num_global_key_value_heads=1, head_dim=256, global_head_dim=512, hidden_size_per_layer_input=256,
            vocab_size=4096, vocab_size_per_layer_input=4096, sliding_window=512, use_double_wide_mlp=True,
        ),  # fmt: skip
        vision=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
            num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
            position_embedding_size=10240, default_output_length=280,
        ),  # fmt: skip
        audio=dict(
            hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, subsampling_conv_channels=[128, 32],
            conv_kernel_size=5, output_proj_dims=1536,
        ),  # fmt: skip
        image_grid=(18, 24) if quick else (36, 45),
        max_soft_tokens=70 if quick else 280,
        audio_frames=200 if quick else 300,
        text_tokens=32,
    )


def small_shape() -> Shape:
    """The CPU test fixture's towers and a slightly wider text model: every feature, seconds per step."""
    return Shape(
        text=dict(
            hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
            num_global_key_value_heads=1, head_dim=32, global_head_dim=64, hidden_size_per_layer_input=16,
            vocab_size=512, vocab_size_per_layer_input=512, sliding_window=8, use_double_wide_mlp=True,
        ),  # fmt: skip
        vision=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=64, default_output_length=70,
        ),  # fmt: skip
        audio=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[16, 8],
            conv_kernel_size=3, output_proj_dims=48,
        ),  # fmt: skip
        image_grid=(10, 12),
        max_soft_tokens=70,
        audio_frames=80,
        text_tokens=24,
    )


def layer_types(layers: int, shared: int) -> list[str]:
    """E2B's pattern (four sliding, one full) ending on a full layer, with each kind non-shared at least once.

    Each KV-shared layer reads the K/V of the last non-shared layer of its kind, so both kinds must
    occur before the shared tail.
    """
    types = ["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(layers)]
    types[-1] = "full_attention"
    if "full_attention" not in types[: layers - shared]:
        types[layers - shared - 1] = "full_attention"
    if "sliding_attention" not in types[: layers - shared]:
        raise SystemExit(f"--layers {layers} with {shared} KV-shared layers leaves no non-shared sliding layer")
    return types


def build_config(shape: Shape, layers: int, shared: int) -> Any:
    """A Gemma4Config with the test fixture's special token ids (all below the shrunk vocab)."""
    from transformers import Gemma4Config

    from gemma4_bridge.testing.fixtures import TinySpec, tiny_config_dict

    config = tiny_config_dict(TinySpec(num_hidden_layers=layers, num_kv_shared_layers=shared))
    config["text_config"].update(shape.text, layer_types=layer_types(layers, shared), attention_k_eq_v=True)
    config["vision_config"].update(shape.vision, use_clipped_linears=True)
    config["audio_config"].update(shape.audio, use_clipped_linears=True)
    return Gemma4Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})


def build_model(config: Any, seed: int, device: str) -> torch.nn.Module:
    """Random float32 model, built on the CPU so the weights do not depend on the device.

    Eager attention for text and vision (reproducible, and what the CPU tests use); the audio tower
    gets the boolean "sdpa" mask its hand-written attention expects, so ``prepare_model`` has nothing
    to repair and the base model is a fair reference.
    """
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_bridge.testing.fixtures import _set_finite_clip_bounds

    torch.manual_seed(seed)
    attn = {"text_config": "eager", "vision_config": "eager", "audio_config": "sdpa"}
    model = Gemma4ForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for param in model.parameters():
            if param.dim() == 1:  # norms start at exactly 0 or 1: perturb so every weight matters
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
        clipped = _set_finite_clip_bounds(model, seed)
    if not clipped:
        raise SystemExit("no Gemma4ClippableLinear with use_clipped_linears found: the towers are not E2B-like")
    return model.to(device).eval()


def multimodal_batch(config: Any, shape: Shape, rows: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    """Rows of text, one image and one audio clip each, built as the Gemma 4 processor lays them out.

    pixel_values are patches (``max_soft_tokens * pooling^2`` per image, real ones first, padding at
    position (-1, -1)); input_features are log-mel frames with ``subsampling_conv_channels[0]`` bins.
    Placeholders use the config's token ids, one per soft token, inside boi/eoi and boa/eoa.
    """
    gen = torch.Generator().manual_seed(seed)
    vision, audio, text = config.vision_config, config.audio_config, config.text_config
    k, p = vision.pooling_kernel_size, vision.patch_size
    h, w = shape.image_grid
    if h % k or w % k or h * w > shape.max_soft_tokens * k * k:
        raise SystemExit(f"image grid {h}x{w} must be multiples of {k} within {shape.max_soft_tokens * k * k} patches")
    patches = shape.max_soft_tokens * k * k
    pixel_values = torch.zeros(rows, patches, 3 * p * p)
    pixel_values[:, : h * w] = torch.rand(rows, h * w, 3 * p * p, generator=gen)
    grid_x, grid_y = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    positions = torch.full((rows, patches, 2), -1, dtype=torch.long)
    positions[:, : h * w] = torch.stack([grid_x, grid_y], dim=-1).reshape(h * w, 2)
    image_tokens = h * w // (k * k)

    frames = shape.audio_frames
    input_features = torch.randn(rows, frames, audio.subsampling_conv_channels[0], generator=gen)
    input_features_mask = torch.ones(rows, frames, dtype=torch.bool)
    audio_tokens = math.ceil(math.ceil(frames / 2) / 2)  # two stride-2 convolutions

    n = shape.text_tokens // 3
    ids = []
    for _ in range(rows):
        words = torch.randint(16, text.vocab_size, (3 * n,), generator=gen).tolist()  # ids < 16 are specials
        ids.append(
            [config.bos_token_id, *words[:n], config.boi_token_id, *[config.image_token_id] * image_tokens,
             config.eoi_token_id, *words[n : 2 * n], config.boa_token_id, *[config.audio_token_id] * audio_tokens,
             config.eoa_token_index, *words[2 * n :]]
        )  # fmt: skip
    input_ids = torch.tensor(ids)
    labels = input_ids.clone()
    placeholders = [config.image_token_id, config.audio_token_id, config.boi_token_id, config.eoi_token_id,
                    config.boa_token_id, config.eoa_token_index]  # fmt: skip
    labels[torch.isin(labels, torch.tensor(placeholders))] = -100
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_position_ids": positions,
        "input_features": input_features,
        "input_features_mask": input_features_mask,
        "labels": labels,
    }
    return {key: value.to(device) for key, value in batch.items()}


def without_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


# -- LoRA helpers -------------------------------------------------------------------------------------
def lora_spec(**kwargs: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=TARGETS, **kwargs)


def wrapped_peft(model: torch.nn.Module) -> Any:
    """The wrapper's recipe: prepare_model, then stock PEFT on the explicit, clamp-safe targets."""
    from peft import get_peft_model

    from gemma4_bridge.train import lora_config, prepare_model

    prepare_model(model)
    return get_peft_model(model, lora_config(model, lora_spec()))


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """Seeded random A and B, drawn on the CPU in parameter order: identical on every copy and device."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * LORA_STD)


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**without_labels(batch)).logits


def merged_site_errors(peft_model: Any, merged: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, float], int]:
    """Per LoRA site: the merged module on the input the unmerged one saw, vs the unmerged output.

    Local, so immune to the amplification of rounding differences through a random network's depth.
    Tower sites are compared at the ``Gemma4ClippableLinear`` wrapper: a delta that landed outside
    the clamp would show here.
    """
    from gemma4_bridge.train import layout_of

    layout = layout_of(peft_model)
    base = peft_model.get_base_model()
    sites = {layout.linears[name.removeprefix("base_model.model.")].wrapper_path
             for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}  # fmt: skip
    errors: dict[str, float] = {}

    def compare(site: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            errors[site] = max(errors.get(site, 0.0), rel_error(merged.get_submodule(site)(args[0]), out))

        return hook

    handles = [base.get_submodule(site).register_forward_hook(compare(site)) for site in sites]
    try:
        logits(peft_model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return errors, len(sites)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def lora_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA gradients of one training forward/backward (use_cache=False, as every trainer runs it)."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch, use_cache=False).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def grad_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[dict[str, float], list[str]]:
    """Relative error per parameter; parameters whose reference gradient is zero (clamped away) are listed apart."""
    errors, zero = {}, []
    for name, want in ref.items():
        if want.norm() == 0:
            zero.append(name)
            continue
        have = got.get(name)
        errors[name] = float("inf") if have is None else rel_error(have, want)
    return errors, zero


def short(name: str) -> str:
    return name.removeprefix("base_model.model.model.").replace(".default.weight", "")


# -- reporting ----------------------------------------------------------------------------------------
class Report:
    """Collects PASS/FAIL/INFO lines; a check that raises is a FAIL with its error, and the run goes on."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def line(self, status: str, name: str, measured: str, bound: str = "") -> None:
        print(f"{status} {name}: {measured}" + (f" ({bound})" if bound else ""), flush=True)
        if status == "FAIL":
            self.failed.append(name)

    def check(self, name: str, ok: bool, measured: str, bound: str) -> None:
        self.line("PASS" if ok else "FAIL", name, measured, bound)

    def run(self, name: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # one broken check must not hide the others' results
            traceback.print_exc()
            self.line("FAIL", name, f"raised {type(exc).__name__}: {exc}"[:400])
        print(f"      [{name}: {time.perf_counter() - start:.1f} s]", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -- checks -------------------------------------------------------------------------------------------
def check_targets(report: Report, base: torch.nn.Module) -> None:
    """a. Stock PEFT refuses the suffix spec on the towers; the wrapper's explicit targets are all wrapped."""
    from peft import get_peft_model

    from gemma4_bridge.train import layout_of, lora_config, prepare_model

    try:
        get_peft_model(copy.deepcopy(base), lora_spec())
        report.line("INFO", "stock_peft_refuses_suffix_targets", "accepted: this PEFT takes Gemma4ClippableLinear itself")
    except ValueError as exc:
        refused = "Gemma4ClippableLinear" in str(exc)
        report.check("stock_peft_refuses_suffix_targets", refused, f"ValueError: {str(exc)[:90]}...", "names Gemma4ClippableLinear")

    model = prepare_model(copy.deepcopy(base))
    layout = layout_of(model)
    config = lora_config(model, lora_spec())
    targets = set(config.target_modules)  # get_peft_model rewrites the list into short suffixes in place
    peft_model = get_peft_model(model, config)
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    by_component: dict[str, int] = {}
    for path in targets:
        component = layout.linears[path].component
        by_component[component] = by_component.get(component, 0) + 1
    towers_inside = all(p.endswith(".linear") for p in targets if layout.linears[p].clippable)
    shared_kv = [p for p in targets if layout.linears[p].text_layer in layout.kv_shared_layers and p.endswith(("k_proj", "v_proj"))]
    ok = wrapped == targets and {"language_model", "vision_tower", "audio_tower"} <= set(by_component) and towers_inside and not shared_kv
    report.check(
        "wrapper_get_peft_model",
        ok,
        f"{len(wrapped)} LoRA modules = {len(targets)} resolved targets {dict(sorted(by_component.items()))}, "
        f"tower targets inside the clamp: {towers_inside}",
        "all targets wrapped, text+vision+audio, towers on .linear, no k/v on KV-shared layers",
    )


def check_forward(
    report: Report, base: torch.nn.Module, batch: dict[str, torch.Tensor], base_logits: torch.Tensor, dtype: torch.dtype, seed: int
) -> None:
    """b + c for one dtype: bit-exact at init, then merged == unmerged with random A and B."""
    name = str(dtype).removeprefix("torch.")
    reference = copy.deepcopy(base).to(dtype)
    # Frozen, as PEFT leaves it: on CPU, bfloat16 linears take another kernel for weights that do not
    # require grad (measured: 2.98 max logit difference on the E2B-shaped model from that flag alone).
    reference.requires_grad_(False)
    want = logits(reference, batch)
    floor = rel_error(want, base_logits)  # what running in this dtype costs at all (0 for float32)
    peft_model = wrapped_peft(reference)  # wraps the same weights: only the LoRA path is new
    got = logits(peft_model, batch)
    diff = (got.float() - want.float()).abs().max().item()
    report.check(f"init_bit_exact_{name}", torch.equal(got, want), f"max |diff| {diff:.3g} over {want.numel()} logits", "torch.equal")

    randomize_lora(peft_model, seed)
    merged_model = copy.deepcopy(peft_model).merge_and_unload()
    site_err, sites = merged_site_errors(peft_model, merged_model, batch)
    unmerged = logits(peft_model, batch)
    moved = rel_error(unmerged, want)
    err = rel_error(logits(merged_model, batch), unmerged)
    bound = FP32_MERGE_BOUND if dtype == torch.float32 else BF16_MERGE_BOUND
    worst = max(site_err, key=site_err.get)
    report.check(
        f"merged_vs_unmerged_sites_{name}",
        site_err[worst] < bound and len(site_err) == sites,
        f"max rel err {site_err[worst]:.3g} over {len(site_err)}/{sites} LoRA sites ({worst}), each merged module "
        "(towers: the whole Gemma4ClippableLinear, clamps included) fed the unmerged run's input",
        f"< {bound:.3g}",
    )
    # End to end, a random model amplifies rounding differences: on the E2B-shaped one (CPU, float32)
    # they doubled with each of the 16 vision layers (8e-7 -> 9e-3) and logits differed by 0.33 rel,
    # with or without a large adapter. So logits are reported; the sites above carry the bound.
    report.line(
        "INFO",
        f"merged_vs_unmerged_logits_{name}",
        f"rel err {err:.3g}; the adapter moves logits by {moved:.3g} rel; {name} vs float32 base logits: {floor:.3g} rel",
        "random weights amplify rounding with depth; not a bound",
    )


def check_gradients(report: Report, base: torch.nn.Module, batch: dict[str, torch.Tensor], seed: int, device: str) -> None:
    """d. Reentrant checkpointing after prepare_model is made exact; without the wrapper it is not."""
    from peft import get_peft_model

    from gemma4_bridge.train import ReentrantCheckpointWarning, layout_of, lora_config

    layout = layout_of(base)
    config = lora_config(base, lora_spec())

    def run(prepare: bool, checkpoint: bool) -> tuple[dict[str, torch.Tensor], list[warnings.WarningMessage]]:
        model = copy.deepcopy(base)
        if prepare:
            peft_model = wrapped_peft(model)
        else:
            peft_model = get_peft_model(model, copy.deepcopy(config))  # PEFT rewrites target_modules in place
        randomize_lora(peft_model, seed)
        if checkpoint:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            peft_model.enable_input_require_grads()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(seed)
            grads = lora_grads(peft_model, batch)
        del peft_model, model
        free(device)
        return grads, caught

    reference, _ = run(prepare=False, checkpoint=False)
    fixed, caught = run(prepare=True, checkpoint=True)
    warned = [w for w in caught if issubclass(w.category, ReentrantCheckpointWarning)]
    report.check("guard_warns_kv_sharing", bool(warned), f"{len(warned)} ReentrantCheckpointWarning", ">= 1")

    errors, zero = grad_errors(fixed, reference)
    # The vision encoder layers are checkpointed too, before the text decoder runs; they are reported apart.
    vision = {n: e for n, e in errors.items() if ".vision_tower." in n}
    rest = {n: e for n, e in errors.items() if n not in vision}
    worst = max(rest, key=rest.get)
    store_kv = [n for n in rest if _is_store_kv(n, layout)]
    audio = [n for n in rest if ".audio_tower." in n]
    report.check(
        "grads_reentrant_with_wrapper_float32",
        rest[worst] < GRAD_BOUND and bool(store_kv) and bool(audio),
        f"max rel err {rest[worst]:.3g} over {len(rest)} text + audio LoRA grads ({short(worst)}), "
        f"{len(store_kv)} of them on K/V-storing layers {list(layout.kv_store_layers)}; {len(zero)} with zero reference grad skipped",
        f"< {GRAD_BOUND:g}",
    )
    worst = max(vision, key=vision.get)
    missing = sum(e == float("inf") for e in vision.values())
    no_grad_inputs = any("requires_grad=True" in str(w.message) for w in caught)  # torch's reentrant-checkpoint warning
    report.check(
        "grads_reentrant_with_wrapper_vision_tower_float32",
        vision[worst] < GRAD_BOUND,
        f"max rel err {vision[worst]:.3g} over {len(vision)} vision LoRA grads, {missing} of them missing (no grad)"
        + ("; torch warned 'None of the inputs have requires_grad=True'" if no_grad_inputs else ""),
        f"< {GRAD_BOUND:g}",
    )

    broken, caught = run(prepare=False, checkpoint=True)
    errors, _ = grad_errors(broken, reference)
    store_errors = {n: e for n, e in errors.items() if _is_store_kv(n, layout)}
    worst = max(store_errors, key=store_errors.get)
    others = [e for n, e in errors.items() if n not in store_errors and ".vision_tower." not in n]
    report.check(
        "control_reentrant_without_wrapper_float32",
        store_errors[worst] > CONTROL_MIN_ERROR,
        f"K/V-storing layers' k/v LoRA: max rel err {store_errors[worst]:.3g} ({short(worst)}); other text + audio "
        f"LoRA: max {max(others):.3g}",
        f"> {CONTROL_MIN_ERROR:g}: the silent bug the guard repairs",
    )


def _is_store_kv(name: str, layout: Any) -> bool:
    return any(f"language_model.layers.{i}.self_attn.{proj}." in name for i in layout.kv_store_layers for proj in ("k_proj", "v_proj"))


def check_step_time(
    report: Report, base: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype, steps: int, device: str
) -> None:
    """e. The wrapper's per-step cost: same targets, same checkpointing, interleaved timed steps."""
    from peft import get_peft_model

    from gemma4_bridge.train import lora_config, prepare_model

    config = lora_config(base, lora_spec())

    def side(prepare: bool, cfg: Any) -> tuple[Any, torch.optim.Optimizer]:
        model = copy.deepcopy(base).to(dtype)
        if prepare:
            prepare_model(model)
        peft_model = get_peft_model(model, copy.deepcopy(cfg))  # PEFT rewrites target_modules in place
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.train()
        return peft_model, torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)

    try:
        plain = side(False, config)
        scope = "text+towers"
    except ValueError:  # a PEFT that refused the tower targets: compare text-only targets on both sides
        config = lora_config(base, lora_spec(exclude_modules=r".*(vision|audio)_tower.*"))
        plain, scope = side(False, config), "text only"
    wrapped = side(True, config)

    def step(pair: tuple[Any, torch.optim.Optimizer]) -> float:
        model, optimizer = pair
        sync(device)
        start = time.perf_counter()
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    for pair in (plain, wrapped, plain, wrapped):  # warm-up: allocator, kernels, AdamW state
        step(pair)
    times: dict[str, list[float]] = {"plain": [], "wrapped": []}
    for i in range(steps):  # alternate who goes first, so drift hits both sides alike
        order = [("plain", plain), ("wrapped", wrapped)]
        for label, pair in order if i % 2 == 0 else order[::-1]:
            times[label].append(step(pair))
    plain_ms, wrapped_ms = (statistics.median(times[k]) * 1e3 for k in ("plain", "wrapped"))
    ratio = wrapped_ms / plain_ms
    pair_ratio = statistics.median(w / p for w, p in zip(times["wrapped"], times["plain"], strict=True))
    measured = (
        f"ratio {ratio:.4f} (median {wrapped_ms:.1f} ms with wrapper / {plain_ms:.1f} ms plain PEFT, {steps} steps each, "
        f"{str(dtype).removeprefix('torch.')}, {scope} targets, non-reentrant checkpointing; median pair ratio {pair_ratio:.4f})"
    )
    if device.startswith("cuda"):
        report.check("step_time_ratio", ratio < STEP_RATIO_GOAL, measured, f"< {STEP_RATIO_GOAL}")
    else:
        report.line("INFO", "step_time_ratio", measured, f"goal < {STEP_RATIO_GOAL}; informational on CPU")


def report_memory(report: Report, device: str) -> None:
    """f. Peak memory: the CUDA allocator's high-water mark, or the process's peak RSS on CPU."""
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        report.line("INFO", "peak_gpu_memory", f"{peak:.2f} GiB allocated (max_memory_allocated)", f"device has {total:.1f} GiB")
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        report.line("INFO", "peak_memory", f"{peak:.2f} GiB peak RSS (CPU run)")


# -- main ---------------------------------------------------------------------------------------------
def print_versions(device: str) -> None:
    import peft
    import transformers

    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; device {device}: {where}", flush=True)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10, help="text decoder layers (default 10)")
    parser.add_argument("--kv-shared", type=int, help="KV-shared layers at the end (default: 40%% of --layers, as 20 of E2B's 35)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "both"], default="both",
        help="dtypes of the forward checks b and c (default both); gradients (d) are always float32, "
        "the step time (e) runs in bfloat16 when selected",
    )  # fmt: skip
    parser.add_argument("--small", action="store_true", help="small widths (the test fixture's towers) for a CPU run")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps and a smaller image/clip")
    parser.add_argument("--steps", type=int, help="timed steps per side (default 20, --quick 6)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --device cpu (and --small) on a machine without a GPU")
        if not _THREADS_SET_BY_USER:  # a GPU box is ours alone: build the 1 B random weights with every core
            torch.set_num_threads(os.cpu_count() or 1)
        # float32 must mean float32: TF32 would blur the 1e-5 and 1e-4 bounds.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print_versions(args.device)

    shape = small_shape() if args.small else e2b_shape(args.quick)
    shared = args.kv_shared if args.kv_shared is not None else max(1, args.layers * 2 // 5)
    config = build_config(shape, args.layers, shared)
    base = build_model(config, args.seed, args.device)
    batch = multimodal_batch(config, shape, rows=2, seed=args.seed + 1, device=args.device)
    params = sum(p.numel() for p in base.parameters())
    text = config.text_config
    print(f"model: {params / 1e6:.1f} M params; text {text.num_hidden_layers} layers {text.layer_types}, KV-shared "
          f"{text.num_kv_shared_layers}, hidden {text.hidden_size}; vision {config.vision_config.num_hidden_layers} x "
          f"{config.vision_config.hidden_size}; audio {config.audio_config.num_hidden_layers} x "
          f"{config.audio_config.hidden_size}; batch {tuple(batch['input_ids'].shape)} with "
          f"{int((batch['input_ids'] == config.image_token_id).sum())} image and "
          f"{int((batch['input_ids'] == config.audio_token_id).sum())} audio placeholder tokens "
          f"(built in {time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip

    report = Report()
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    report.run("a_targets", lambda: check_targets(report, base))
    base_logits = logits(base, batch)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        report.run(f"bc_forward_{name}", lambda dtype=dtype: check_forward(report, base, batch, base_logits, dtype, args.seed + 2))
        free(args.device)
    report.run("d_gradients", lambda: check_gradients(report, base, batch, args.seed + 3, args.device))
    free(args.device)
    steps = args.steps or (6 if args.quick else 20)
    step_dtype = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32
    report.run("e_step_time", lambda: check_step_time(report, base, batch, step_dtype, steps, args.device))
    report_memory(report, args.device)

    verdict = f"FAILED: {', '.join(report.failed)}" if report.failed else "all checks passed"
    print(f"{verdict} ({time.perf_counter() - started:.0f} s)")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
