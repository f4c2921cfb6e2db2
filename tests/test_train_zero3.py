"""The training wrapper under a real 2-rank DeepSpeed ZeRO-3 run on CPU (gloo), through trl.SFTTrainer.

One job (this file run as a script by ``torch.distributed.run``) trains three times on the tiny
Gemma 4 with identical data and LoRA init, every parameter partitioned
(``stage3_param_persistence_threshold=0``):

* ``wrapper``:   Gemma4SFTTrainer, SFTConfig defaults (checkpointing on). TRL forces
                 ``use_reentrant=True`` for PEFT + ZeRO-3; the wrapper switches it back. Saves a
                 checkpoint every step, then ``save_model``.
* ``reference``: stock SFTTrainer, no checkpointing: the true gradients.
* ``stock``:     stock SFTTrainer, SFTConfig defaults: the silent bug, measured.

Gradients are read in ``DeepSpeedEngine.step`` with ``safe_get_full_grad`` (gathered); the trained
weights independently with ``safe_get_full_fp32_param`` (the optimizer's fp32 partitions).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.deepspeed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
STEPS = 2


# -- the job (runs on each rank) ----------------------------------------------------------------
def _worker(model_dir: Path, out: Path) -> None:
    import deepspeed
    import torch
    from datasets import Dataset
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from gemma4_bridge.errors import BridgeError
    from gemma4_bridge.testing.fixtures import load_tiny_model
    from gemma4_bridge.train import Gemma4SFTTrainer, lora_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    captured: dict[str, dict[str, Any]] = {}
    current = {"run": ""}
    original_step = deepspeed.runtime.engine.DeepSpeedEngine.step

    def step(engine: Any, *args: Any, **kwargs: Any) -> Any:
        grads = captured.setdefault(current["run"], {})
        if not grads:  # first optimizer step of this run; safe_get_full_grad is a collective
            for name, param in engine.module.named_parameters():
                if param.requires_grad:
                    grad = safe_get_full_grad(param)
                    grads[name] = None if grad is None else grad.detach().clone()
        return original_step(engine, *args, **kwargs)

    deepspeed.runtime.engine.DeepSpeedEngine.step = step
    ds_config = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        "the quick brown fox jumps over the lazy dog. gemma four adapters serve what was trained.",
        "low rank adaptation keeps the base frozen and learns a small delta.",
        "shared key value layers reuse the cache of an earlier layer.",
        "a sentence about numbers one two three four five six.",
    ]
    dataset = Dataset.from_dict({"text": texts})
    record: dict[str, Any] = {}

    def trainer(run: str, cls: type, **config: Any) -> Any:
        current["run"] = run
        defaults: dict[str, Any] = {
            "max_steps": STEPS,
            "per_device_train_batch_size": 1,
            "learning_rate": 1e-2,
            "max_grad_norm": 0.0,
            "use_cpu": True,
            "bf16": False,
            "report_to": [],
            "save_strategy": "no",
            "logging_steps": 1,
            "disable_tqdm": True,
            "deepspeed": ds_config,
        }
        args = SFTConfig(output_dir=str(out / run), **{**defaults, **config})
        model = load_tiny_model(model_dir)  # partitioned at load (zero.Init) since args carry ZeRO-3
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        if cls is SFTTrainer:
            peft_config = lora_config(model, peft_config)  # same targets; stock PEFT refuses the towers
        torch.manual_seed(0)  # identical LoRA init on every rank and in every run
        return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)

    # 1. the wrapper, SFTConfig defaults, checkpoint every step
    wrapped = trainer("wrapper", Gemma4SFTTrainer, save_strategy="steps", save_steps=1)
    record["wrapper_gc_kwargs"] = dict(wrapped.args.gradient_checkpointing_kwargs or {})
    wrapped.train()
    wrapped.save_model(str(out / "wrapper" / "final"))
    model = wrapped.model
    truth = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            truth[name] = safe_get_full_fp32_param(param).detach().clone()  # collective
    naive = get_peft_model_state_dict(model)  # what a bare PEFT save would write (no gather)
    record["naive_empty_tensors"] = sum(1 for v in naive.values() if v.numel() == 0)
    record["naive_tensors"] = len(naive)
    try:
        model.save_pretrained(str(out / "bare"))
        record["bare_save"] = "saved"
    except BridgeError as err:
        record["bare_save"] = str(err)

    # 2. the reference: no checkpointing; 3. stock TRL defaults (reentrant forced)
    trainer("reference", SFTTrainer, gradient_checkpointing=False).train()
    stock = trainer("stock", SFTTrainer)
    record["stock_gc_kwargs"] = dict(stock.args.gradient_checkpointing_kwargs or {})
    stock.train()
    record["stock_runs_reentrant"] = _runs_reentrant(stock.model)

    if rank == 0:
        torch.save({"grads": captured, "truth": truth}, out / "tensors.pt")
        (out / "record.json").write_text(json.dumps(record, indent=1))
    torch.distributed.barrier()


def _runs_reentrant(model: Any) -> bool | None:
    """What the checkpointed layers really run (None: none is checkpointed). TRL asks for reentrant by
    setting args.gradient_checkpointing_kwargs, which transformers 5.24 no longer reads (it reads
    activation_checkpointing_kwargs, default use_reentrant=False)."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            keywords = getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", None) or {}
            return keywords.get("use_reentrant") is not False
    return None


# -- the test (runs in pytest) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero3_training(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train_zero3")
    from gemma4_bridge.testing.zero3_job import failure_report, launch_cpu_ranks

    proc = launch_cpu_ranks([__file__, str(tiny_dir), str(out)], world_size=2, env={"DS_ACCELERATOR": "cpu"}, timeout_s=420)
    if proc.returncode != 0:
        pytest.fail("ZeRO-3 job failed:\n" + failure_report(proc))
    return out


def _load(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    return torch.load(out / "tensors.pt", weights_only=True), json.loads((out / "record.json").read_text())


def _rel(got: Any, want: Any) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_zero3_gradients_match_no_checkpointing(zero3_training: Path) -> None:
    tensors, record = _load(zero3_training)
    grads = tensors["grads"]
    reference = {n: g for n, g in grads["reference"].items() if g is not None and g.norm() > 0}
    assert len(reference) >= 20, sorted(grads["reference"])
    store_kv = [n for n in reference if ".language_model.layers.2.self_attn.k_proj" in n or ".layers.1.self_attn.k_proj" in n]
    assert len(store_kv) == 4, "the K/V-storing layers' LoRA must be compared"
    # TRL really forced reentrant checkpointing in both checkpointed runs.
    assert record["wrapper_gc_kwargs"].get("use_reentrant") is True
    assert record["stock_gc_kwargs"].get("use_reentrant") is True
    wrapper = {n: _rel(grads["wrapper"][n], g) for n, g in reference.items()}
    assert max(wrapper.values()) < 1e-5, wrapper
    stock = {n: _rel(grads["stock"][n], g) for n, g in reference.items()}
    if record["stock_runs_reentrant"]:
        assert max(stock[n] for n in store_kv) > 0.1, stock  # the bug the wrapper repairs, in this very run
    else:  # this TRL + transformers pair does not reach reentrant checkpointing: stock is exact too
        assert record["stock_runs_reentrant"] is False, "the stock run must be checkpointed"
        assert max(stock.values()) < 1e-5, stock


def test_zero3_saved_adapters_hold_gathered_values(zero3_training: Path, tiny_dir: Path) -> None:
    from gemma4_bridge.adapter_io import METADATA_KEY, AdapterDir
    from gemma4_bridge.layout import Gemma4Layout
    from gemma4_bridge.names import resolve_key

    tensors, record = _load(zero3_training)
    # The setting really damages a naive save: every LoRA tensor is a [0]-shaped placeholder.
    assert record["naive_empty_tensors"] == record["naive_tensors"] > 0
    assert "save_adapter" in record["bare_save"] and "ZeRO-3" in record["bare_save"]
    truth = {k.replace(".default", ""): v for k, v in tensors["truth"].items()}
    layout = Gemma4Layout.from_model_dir(tiny_dir)
    final = zero3_training / "wrapper" / "final"
    for out in (zero3_training / "wrapper" / f"checkpoint-{STEPS}", final):
        adapter = AdapterDir.open(out)
        assert METADATA_KEY in adapter.safetensors_metadata
        saved = dict(adapter.iter_tensors())
        assert saved.keys() == truth.keys(), out
        for key, value in saved.items():
            assert value.numel() > 0 and value.shape == truth[key].shape, key
            assert resolve_key(key, layout).canonical_key == key
            assert (value.float() - truth[key]).abs().max() == 0, key
    # Step 1's checkpoint holds step-1 weights, not the final ones: saved during training, gathered then.
    first = dict(AdapterDir.open(zero3_training / "wrapper" / "checkpoint-1").iter_tensors())
    assert all(v.numel() > 0 for v in first.values())
    assert any((first[k] - truth[k]).abs().max() > 0 for k in first)
    assert (final / "tokenizer_config.json").is_file()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
