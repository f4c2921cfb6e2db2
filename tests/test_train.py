"""The training wrapper on the real stack (transformers + PEFT + TRL), single process.

Every claim is checked with numbers against an independent reference: logits of the base model,
effective weights W + scaling * B @ A computed here, gradients of a run without checkpointing.
The tiny fixture has finite clip bounds, KV-shared layers 3,4 (reusing 2,1) and k_eq_v on layer 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from convert_helpers import base_plus, lora_deltas, randomize_lora
from peft import LoraConfig, PeftModel, get_peft_model

from gemma4_bridge.adapter_io import METADATA_KEY, AdapterDir
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.testing.fixtures import load_tiny_model
from gemma4_bridge.layout import Gemma4Layout
from gemma4_bridge.names import resolve_key
from gemma4_bridge.train import (
    ReentrantCheckpointWarning,
    check_transformers_version,
    layout_of,
    lora_config,
    multimodal_collator,
    prepare_model,
    resolve_target_modules,
    save_adapter,
)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


# -- shared inputs ------------------------------------------------------------------------------
def _image(seed: int) -> Any:
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(32, 32, 3) * 255).astype("uint8"))


def _audio(seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).randn(4000) * 0.3).astype(np.float32)


@pytest.fixture(scope="module")
def processor(tiny_dir: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def mm_batch(processor: Any) -> dict[str, torch.Tensor]:
    """One row that goes through the text model, the vision tower and the audio tower."""
    text = f"a picture {processor.image_token} of a cat and a sound {processor.audio_token} of rain"
    return dict(processor(text=[text], images=[[_image(0)]], audio=[_audio(0)], return_tensors="pt"))


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _assert_agree(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """float32 agreement: relative error of the whole logits tensor below ``tol``.

    Merging reassociates x @ (W + BA) vs x @ W + (x @ A) @ B, which costs ~1e-5 *absolute* on a
    few of 44k logits after five layers; the norm-relative error stays near 1e-6.
    """
    err = ((got - want).norm() / want.norm()).item()
    assert err < tol, f"relative error {err:.3g} >= {tol}"


def _peft(tiny_dir: Path, target_modules: Any = ATTN, **kwargs: Any) -> Any:
    model = prepare_model(load_tiny_model(tiny_dir))
    return get_peft_model(model, lora_config(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, **kwargs)))


# -- 1. clippable towers ------------------------------------------------------------------------
def test_suffix_targets_resolve_to_tower_linears(tiny_dir: Path) -> None:
    layout = Gemma4Layout.from_model_dir(tiny_dir)
    model = load_tiny_model(tiny_dir)
    targets = resolve_target_modules(model, LoraConfig(target_modules=ATTN))
    expected = sorted(s.path for s in layout.linears.values() if s.leaf in ATTN)
    assert targets == expected
    tower_targets = [t for t in targets if layout.linears[t].clippable]
    assert {layout.linears[t].component for t in tower_targets} == {"vision_tower", "audio_tower"}
    assert all(t.endswith(".linear") for t in tower_targets)
    # KV-shared layers 3 and 4 have no k/v_proj; layer 1 (k_eq_v) has no v_proj.
    assert "model.language_model.layers.3.self_attn.k_proj" not in targets
    assert "model.language_model.layers.1.self_attn.v_proj" not in targets
    # Stock PEFT refuses the same spec (the bug this fixes), so the test exercises a real repair.
    with pytest.raises(ValueError, match="Gemma4ClippableLinear"):
        get_peft_model(load_tiny_model(tiny_dir), LoraConfig(target_modules=ATTN))


def test_target_spec_forms(tiny_dir: Path) -> None:
    model = load_tiny_model(tiny_dir)
    layout = layout_of(model)
    # all-linear: the same modules stock PEFT wraps for "all-linear".
    stock = get_peft_model(load_tiny_model(tiny_dir), LoraConfig(target_modules="all-linear"))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in stock.named_modules() if hasattr(m, "lora_A"))
    assert resolve_target_modules(model, LoraConfig(target_modules="all-linear")) == wrapped
    # A regex naming the tower wrapper lands on its inner linear.
    assert resolve_target_modules(model, LoraConfig(target_modules=r".*vision_tower.*\.q_proj")) == [
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear"
    ]
    # Layer selection and exclusions are applied by PEFT's own matcher, then cleared.
    config = lora_config(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], exclude_modules=r".*audio.*"))
    assert sorted(config.target_modules) == [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear",
    ]
    assert config.layers_to_transform is None and config.exclude_modules is None
    # rank_pattern written against the name users see ("q_proj") reaches the tower's q_proj.linear.
    config = lora_config(model, LoraConfig(r=4, target_modules=ATTN, rank_pattern={"q_proj": 8}))
    assert config.rank_pattern["model.audio_tower.layers.0.self_attn.q_proj.linear"] == 8
    assert "model.audio_tower.layers.0.self_attn.k_proj.linear" not in config.rank_pattern
    assert set(config.rank_pattern) <= set(layout.linears)
    # No targets: PEFT's gemma4 default (text q_proj/v_proj), made explicit.
    assert resolve_target_modules(model, LoraConfig()) == sorted(
        s.path for s in layout.linears.values() if s.component == "language_model" and s.leaf in ("q_proj", "v_proj")
    )
    with pytest.raises(BridgeError, match="matches no module"):
        resolve_target_modules(model, LoraConfig(target_modules=["no_such_proj"]))


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"trainable_token_indices": [3, 5]}, "trainable_token_indices=[3, 5]"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head is tied to embed_tokens"),
    ],
)
def test_unservable_lora_configs_are_refused_before_training(tiny_dir: Path, kwargs: dict, expect: str) -> None:
    """What save_adapter (the planner) would refuse after the run is refused by lora_config, before it."""
    with pytest.raises(BridgeError, match=re.escape(expect)) as err:
        lora_config(load_tiny_model(tiny_dir), LoraConfig(**{"target_modules": ATTN, **kwargs}))
    assert err.value.fix and ("plain LoRA" in err.value.fix or "out of target_modules" in err.value.fix)



def test_pattern_over_a_container_gets_a_pattern_that_works(tiny_dir: Path) -> None:
    """'.*vision_tower.*' matches the tower's containers too (PEFT itself refuses those): the fix names
    the same pattern ending in the tower's linears, and that pattern reaches exactly them."""
    model = load_tiny_model(tiny_dir)
    with pytest.raises(BridgeError, match=r"reaches model\.vision_tower, .* \(and \d+ more\)") as err:
        lora_config(model, LoraConfig(target_modules=r".*vision_tower.*"))
    suggestion = re.search(r"r'([^']+)'", err.value.fix).group(1)
    assert suggestion.startswith(r".*vision_tower.*\.(")
    vision = {p for p, site in Gemma4Layout.from_model_dir(tiny_dir).linears.items() if site.component == "vision_tower"}
    assert set(lora_config(model, LoraConfig(target_modules=suggestion)).target_modules) == vision

def test_save_adapter_on_plain_peft_model(tiny_dir: Path, all_linear_adapter: Path, tmp_path: Path) -> None:
    """No prepare_model, stock PEFT all-linear: save_adapter still writes the canonical, identical tensors."""
    model = PeftModel.from_pretrained(load_tiny_model(tiny_dir), all_linear_adapter)
    out = save_adapter(model, tmp_path / "canonical")
    original = dict(AdapterDir.open(all_linear_adapter).iter_tensors())
    saved = dict(AdapterDir.open(out).iter_tensors())
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    assert AdapterDir.open(out).config["target_modules"] == sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in saved})


def test_forward_at_init_is_bit_exact(tiny_dir: Path, mm_batch: dict[str, torch.Tensor]) -> None:
    base = _logits(load_tiny_model(tiny_dir), mm_batch)
    assert torch.equal(_logits(_peft(tiny_dir, "all-linear"), mm_batch), base)
    assert torch.equal(_logits(_peft(tiny_dir), mm_batch), base)


def test_delta_acts_inside_the_clamp(tiny_dir: Path, mm_batch: dict[str, torch.Tensor]) -> None:
    model = _peft(tiny_dir)
    randomize_lora(model)
    unmerged = _logits(model, mm_batch)
    base_model = load_tiny_model(tiny_dir)
    base = _logits(base_model, mm_batch)
    assert (unmerged - base).abs().max() > 0.05  # the adapter moves logits, so equalities below mean something

    # Independent reference: W' = W + scaling * B @ A on every target, computed here, in a fresh base model.
    deltas = lora_deltas(model)
    _assert_agree(unmerged, _logits(base_plus(tiny_dir, deltas), mm_batch))
    _assert_agree(_logits(model.merge_and_unload(), mm_batch), unmerged)

    # Control: the same delta added outside the clamp (what an nn.Linear-subclass wrapper does)
    # changes the output measurably, so the clip bounds bite and the check above has teeth.
    outside = load_tiny_model(tiny_dir)
    layout = layout_of(outside)
    with torch.no_grad():
        for path, delta in deltas.items():
            if layout.linears[path].clippable:
                wrapper = outside.get_submodule(layout.linears[path].wrapper_path)
                wrapper.register_forward_hook(lambda m, args, out, d=delta: out + args[0] @ d.T)
            else:
                outside.get_submodule(path).weight += delta
    assert ((_logits(outside, mm_batch) - unmerged).norm() / unmerged.norm()) > 1e-3


def test_saved_adapter_is_canonical_and_reloads_without_registration(
    tiny_dir: Path, mm_batch: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    from gemma4_bridge.converters.canonical import plan

    model = _peft(tiny_dir)
    randomize_lora(model)
    trained = _logits(model, mm_batch)
    out = save_adapter(model, tmp_path / "adapter")
    adapter = AdapterDir.open(out)
    layout = Gemma4Layout.from_model_dir(tiny_dir)
    shapes = adapter.tensor_shapes()
    for key in shapes:
        res = resolve_key(key, layout)
        assert res is not None and res.canonical_key == key and res.variant == "transformers" and not res.added_linear
    assert "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.lora_A.weight" in shapes
    assert isinstance(adapter.config["target_modules"], list)
    # Explicit paths (PEFT itself compresses long lists into minimal suffixes such as "1.self_attn.k_proj").
    assert adapter.config["target_modules"] == resolve_target_modules(load_tiny_model(tiny_dir), LoraConfig(target_modules=ATTN))
    meta = json.loads(adapter.safetensors_metadata[METADATA_KEY])
    assert meta["source"] == "gemma4_bridge.train" and "trained_with" in meta
    report = plan(out, layout)  # the converters' own view: nothing to rename, drop, recover or fix
    assert report.healthy and not report.problems and not report.dropped and report.renamed == 0, report.problems
    assert report.config == adapter.config

    # Reload into a fresh base with stock PEFT: no custom module registration needed.
    reloaded = PeftModel.from_pretrained(load_tiny_model(tiny_dir), out)
    assert torch.equal(_logits(reloaded, mm_batch), trained)


# -- 2. KV sharing ------------------------------------------------------------------------------
def test_broken_transformers_releases_are_refused(
    tiny_dir: Path, tiny_text_only_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    model = load_tiny_model(tiny_dir)
    monkeypatch.setattr(transformers, "__version__", "5.5.1")
    with pytest.raises(BridgeError, match=r"transformers 5\.5\.1 computes wrong K/V"):
        prepare_model(model)
    monkeypatch.undo()
    layout = Gemma4Layout.from_model_dir(tiny_dir)
    for version in ("5.5.0", "5.5.1"):
        with pytest.raises(BridgeError, match=r"transformers>=5\.5\.2") as err:
            check_transformers_version(layout, version)
        assert "[3, 4]" in str(err.value)
    check_transformers_version(layout, "5.5.2")
    check_transformers_version(Gemma4Layout.from_model_dir(tiny_text_only_dir), "5.5.1")  # no KV sharing: fine


def _lora_grads(model: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    assert got.keys() == ref.keys() and ref
    errors = {}
    for name, want in ref.items():
        assert want.norm() > 0, f"{name}: zero reference gradient makes the comparison meaningless"
        errors[name] = ((got[name] - want).norm() / want.norm()).item()
    return errors


def test_reentrant_checkpointing_is_switched_off(tiny_dir: Path) -> None:
    ids = torch.randint(16, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    text_attn = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"

    def run(prepare: bool, checkpoint: bool) -> dict[str, torch.Tensor]:
        model = load_tiny_model(tiny_dir)
        if prepare:
            prepare_model(model)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=text_attn, init_lora_weights=False))
        if checkpoint:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            peft_model.enable_input_require_grads()
        torch.manual_seed(0)
        return _lora_grads(peft_model, ids)

    torch.manual_seed(0)
    reference = run(prepare=False, checkpoint=False)
    torch.manual_seed(0)
    broken = _rel_errors(run(prepare=False, checkpoint=True), reference)
    # Measured bug: store layers' k/v LoRA (layer 2 stores for layer 3) get wrong gradients.
    assert broken["base_model.model.model.language_model.layers.2.self_attn.k_proj.lora_A.default.weight"] > 0.1
    torch.manual_seed(0)
    with pytest.warns(ReentrantCheckpointWarning, match="use_reentrant=False"):
        fixed = _rel_errors(run(prepare=True, checkpoint=True), reference)
    assert max(fixed.values()) < 1e-5, fixed


def test_unrepairable_checkpointing_is_refused(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where non-reentrant cannot be guaranteed, refuse instead of training on wrong gradients."""
    from gemma4_bridge import upstream_bugs

    ids = torch.randint(16, 500, (1, 8), generator=torch.Generator().manual_seed(1))
    model = prepare_model(load_tiny_model(tiny_dir)).train()
    # An opaque checkpoint function (not a functools.partial): its mode cannot be read.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = lambda fn, *args: torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=True)
    with pytest.raises(BridgeError, match="use_reentrant': False"):
        model(input_ids=ids, labels=ids, use_cache=False)
    # ZeRO-3 on a DeepSpeed without recompute attribution (PR 8130): non-reentrant would crash there.
    model = prepare_model(load_tiny_model(tiny_dir)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.model.language_model.layers[0].self_attn.q_proj.weight.ds_id = 0  # what ZeRO-3 partitioning marks
    # (a stand-in for such a DeepSpeed: the detection reads the installed source, which has PR 8130)
    monkeypatch.setitem(upstream_bugs.BY_KEY, "deepspeed-zero3-nonreentrant", dataclasses.replace(
        upstream_bugs.BY_KEY["deepspeed-zero3-nonreentrant"], detect=lambda: upstream_bugs.Finding(True, "stand-in")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BridgeError, match="PR 8130"):
            model(input_ids=ids, labels=ids, use_cache=False)


# -- 5. TRL -------------------------------------------------------------------------------------
def _rows(processor: Any, modality: str, n: int = 4) -> list[dict[str, Any]]:
    texts = [
        "the quick brown fox jumps over the lazy dog.",
        "low rank adaptation keeps the base frozen and learns a small delta.",
        "shared key value layers reuse the cache of an earlier layer.",
        "vision and audio towers clamp their inputs and outputs.",
    ]
    rows = []
    for i in range(n):
        text = texts[i % len(texts)]
        if modality == "image":
            rows.append({"text": f"{processor.image_token} {text}", "images": [_image(i)]})
        elif modality == "audio":
            rows.append({"text": f"{processor.audio_token} {text}", "audio": [_audio(i).tolist()]})
        else:
            rows.append({"text": text})
    return rows


class _GradCapture:
    """TrainerCallback-compatible: grabs the LoRA gradients of the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not self.grads:
            # Tower LoRA gets no gradient on rows without that modality (grad is None): skip those.
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def _sft(
    tiny_dir: Path,
    processor: Any,
    modality: str,
    out: Path,
    *,
    wrapper: bool = True,
    steps: int = 1,
    lr: float = 1e-3,
    target_modules: Any = ATTN,
    rows: int = 4,
    **config: Any,
) -> tuple[Any, _GradCapture]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from gemma4_bridge.train import Gemma4SFTTrainer

    torch.manual_seed(0)
    model = load_tiny_model(tiny_dir)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    if not wrapper:
        peft_config = lora_config(model, peft_config)  # same targets; stock PEFT cannot take the towers otherwise
    defaults: dict[str, Any] = {
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "learning_rate": lr,
        "max_grad_norm": 0.0,  # compare raw gradients
        "use_cpu": True,
        "bf16": False,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "remove_unused_columns": False,
    }
    args = SFTConfig(output_dir=str(out), **{**defaults, **config})
    capture = _GradCapture()
    cls = Gemma4SFTTrainer if wrapper else SFTTrainer
    trainer = cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_rows(processor, modality, rows)),
        processing_class=processor,
        data_collator=multimodal_collator(processor),
        peft_config=peft_config,
        callbacks=[capture],
    )
    torch.manual_seed(0)
    trainer.train()
    return trainer, capture


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_sft_gradients_match_no_checkpointing(tiny_dir: Path, processor: Any, modality: str, tmp_path: Path) -> None:
    _, reference = _sft(tiny_dir, processor, modality, tmp_path / "ref", gradient_checkpointing=False)
    _, default = _sft(tiny_dir, processor, modality, tmp_path / "gc")  # SFTConfig defaults: checkpointing on
    errors = _rel_errors(default.grads, reference.grads)
    assert max(errors.values()) < 1e-5, errors
    store_kv = [n for n in errors if ".layers.2.self_attn.k_proj" in n or ".layers.1.self_attn.k_proj" in n]
    assert store_kv, "the K/V-storing layers' LoRA must be among the compared parameters"
    tower = "vision_tower" if modality == "image" else "audio_tower" if modality == "audio" else None
    if tower:
        assert any(tower in n and reference.grads[n].norm() > 0 for n in errors), f"{tower} LoRA got no gradient"


def test_sft_reentrant_request_is_repaired(tiny_dir: Path, processor: Any, tmp_path: Path) -> None:
    """What TRL forces under PEFT + ZeRO-3 (use_reentrant=True), here without DeepSpeed."""
    reentrant = {"gradient_checkpointing_kwargs": {"use_reentrant": True}}
    _, reference = _sft(tiny_dir, processor, "text", tmp_path / "ref", gradient_checkpointing=False)
    _, stock = _sft(tiny_dir, processor, "text", tmp_path / "stock", wrapper=False, **reentrant)
    assert max(_rel_errors(stock.grads, reference.grads).values()) > 0.1  # the silent bug, measured
    with pytest.warns(ReentrantCheckpointWarning):
        _, fixed = _sft(tiny_dir, processor, "text", tmp_path / "fixed", **reentrant)
    errors = _rel_errors(fixed.grads, reference.grads)
    assert max(errors.values()) < 1e-5, errors


def test_overfit_loss_falls_and_saved_adapter_reproduces_model(
    tiny_dir: Path, processor: Any, mm_batch: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    batch = multimodal_collator(processor)(_rows(processor, "text", 2))
    with torch.no_grad():
        before = load_tiny_model(tiny_dir)(**batch).loss.item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _ = _sft(
            tiny_dir, processor, "text", tmp_path / "run", steps=30, lr=3e-2, rows=2, lr_scheduler_type="constant",
            target_modules=[*ATTN, "gate_proj", "up_proj", "down_proj"], save_strategy="steps", save_steps=30,
        )  # fmt: skip
    with torch.no_grad():
        after = trainer.model.eval()(**batch).loss.item()
    # The tiny model's logits are bounded (tied 64-d embeddings of std ~0.02), so ln(512) = 6.24 can
    # only fall by about one nat; a drop of 0.4 on the training rows is far beyond noise (seeded run).
    print(f"loss on the training rows: {before:.3f} -> {after:.3f}")
    assert after < before - 0.4, (before, after)
    model = trainer.model.eval()
    trained = _logits(model, mm_batch)
    # Checkpoint written during training, final save_model, and a bare save_pretrained: all canonical.
    final = tmp_path / "final"
    trainer.save_model(str(final))
    bare = tmp_path / "bare"
    model.save_pretrained(str(bare))
    layout = Gemma4Layout.from_model_dir(tiny_dir)
    for out in (tmp_path / "run" / "checkpoint-30", final, bare):
        adapter = AdapterDir.open(out)
        assert METADATA_KEY in adapter.safetensors_metadata, out
        assert all(resolve_key(k, layout).canonical_key == k for k in adapter.tensor_shapes()), out
        reloaded = PeftModel.from_pretrained(load_tiny_model(tiny_dir), out)
        _assert_agree(_logits(reloaded, mm_batch), trained)
    assert (final / "tokenizer_config.json").is_file() or (final / "processor_config.json").is_file()


def test_trainer_needs_a_loaded_model() -> None:
    from gemma4_bridge.train import Gemma4SFTTrainer

    with pytest.raises(BridgeError, match="loaded model"):
        Gemma4SFTTrainer(model=os.fspath("google/gemma-4-e2b"))


def test_eager_audio_mask_is_repaired_where_broken(tiny_dir: Path, mm_batch: dict[str, torch.Tensor]) -> None:
    """Where eager reads the audio mask inverted (transformers <= 5.23), prepare_model restores the
    sdpa mask; where it is fixed (5.24), the model is left untouched and nothing is printed.

    The reference where eager is broken (load_tiny_model: sdpa mask for the audio tower) is the one
    vLLM's independent audio implementation matches to ~1e-6 (tests/test_vllm_engine.py).
    """
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_bridge.train import prepare_model
    from gemma4_bridge.upstream_bugs import present

    eager = Gemma4ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager").eval()
    before = _logits(eager, mm_batch)
    if present("transformers-eager-audio-mask"):
        from gemma4_bridge.train import AudioAttentionMaskWarning

        reference = _logits(load_tiny_model(tiny_dir), mm_batch)
        assert (before - reference).abs().max() > 1e-2  # the upstream defect is real here
        with pytest.warns(AudioAttentionMaskWarning, match="audio tower"):
            prepare_model(eager)
        assert eager.config.text_config._attn_implementation == "eager"  # text attention untouched
        _assert_agree(_logits(eager, mm_batch), reference)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # fixed upstream: no repair, no warning
            prepare_model(eager)
        assert eager.model.audio_tower.config._attn_implementation == "eager"
        assert torch.equal(_logits(eager, mm_batch), before)  # untouched, and audio still runs


def test_vision_lora_trains_under_reentrant_checkpointing(tiny_dir: Path, mm_batch: dict[str, torch.Tensor]) -> None:
    """Reentrant checkpointing gives vision-tower LoRA no gradient (its inputs need no grad); the guard fixes it."""
    # q/k are left out: on the tiny tower their gradients are ~1e-9 (saturated attention), i.e. noise.
    vision = r".*vision_tower.*\.(v_proj|o_proj|gate_proj|up_proj|down_proj)\.linear"

    def grads(prepare: bool, checkpoint: bool) -> dict[str, torch.Tensor | None]:
        model = load_tiny_model(tiny_dir)
        if prepare:
            prepare_model(model)
        torch.manual_seed(0)  # the same random LoRA init in every run
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=vision, init_lora_weights=False)).train()
        if checkpoint:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            peft_model.enable_input_require_grads()
        peft_model(**mm_batch, labels=mm_batch["input_ids"], use_cache=False).loss.backward()
        return {n: (p.grad.clone() if p.grad is not None else None) for n, p in peft_model.named_parameters() if "lora_" in n}

    reference = grads(prepare=False, checkpoint=False)
    assert reference and all(g is not None and g.norm() > 1e-3 for g in reference.values())
    broken = grads(prepare=False, checkpoint=True)
    assert all(g is None for g in broken.values()), "stock reentrant checkpointing should starve the vision LoRA"
    with pytest.warns(ReentrantCheckpointWarning, match="vision-tower LoRA"):
        fixed = grads(prepare=True, checkpoint=True)
    for name, want in reference.items():
        got = fixed[name]
        assert got is not None, name
        assert float((got - want).norm() / want.norm()) < 1e-5, name
