"""A real DeepSpeed ZeRO-3 LoRA training run on CPU (gloo), reproducing the "damaged adapter" bug.

Why: under ZeRO-3 every partitioned parameter is a zero-element placeholder on each rank, so a
``peft_model.save_pretrained`` that does not gather first writes an adapter whose large tensors
have shape ``[0]`` while small ones (below ``stage3_param_persistence_threshold``) save intact.
Converters, the demo and the training wrapper all need that exact artefact, made by DeepSpeed
itself, not by a mock. One call produces, in ``out_dir``::

    checkpoint-<steps>/               the damaged adapter, saved the naive way (HF Trainer layout)
        adapter_config.json
        adapter_model.safetensors     zero-element tensors for every partitioned LoRA weight
        latest                        DeepSpeed tag file ("global_step<steps>")
        global_step<steps>/           zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt, R < world_size
    reference_adapter/                the same adapter gathered correctly (GatheredParameters): the truth
    job.json                          what was run: steps, world size, dtype, damaged/intact tensor names

Library use::

    from gemma4_bridge.testing.zero3_job import run_zero3_job
    result = run_zero3_job(model_dir, out_dir)           # ~60-90 s on 2 CPU cores (first run JIT-builds an op)
    result.damaged_adapter, result.checkpoint_dir, result.reference_adapter

Command line: ``python -m gemma4_bridge.testing.zero3_job MODEL_DIR OUT_DIR [--steps 3] [--world-size 2]``.
The workers are launched with ``torch.distributed.run`` in a subprocess, so the caller's process
never imports DeepSpeed or joins a process group.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

# Small enough that the tiny model's tower LoRA factors (r*32 = 128 elements) stay whole while
# the text ones (>= 256 elements) are partitioned: "half the layers" survive, as in real runs.
PERSISTENCE_THRESHOLD = 200
_WORKER_ENV = "GEMMA4_BRIDGE_ZERO3_WORKER"


@dataclass(frozen=True)
class Zero3JobResult:
    """Paths written by :func:`run_zero3_job`."""

    out_dir: Path
    damaged_adapter: Path  # also holds the DeepSpeed checkpoint (``latest`` + ``global_stepN/``)
    checkpoint_dir: Path  # == damaged_adapter: where DeepSpeed's ``latest`` file lives
    reference_adapter: Path  # correctly gathered adapter (ground truth for recovery)
    steps: int
    world_size: int


def run_zero3_job(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    steps: int = 3,
    world_size: int = 2,
    r: int = 4,
    lora_alpha: int = 8,
    dtype: str = "float32",
    exclude_modules: list[str] | None = None,
    target_parameters: list[str] | None = None,
    timeout_s: float = 600,
) -> Zero3JobResult:
    """Train a PEFT all-linear LoRA with ZeRO-3 on ``world_size`` CPU ranks and save both artefacts.

    ``exclude_modules`` is passed to PEFT's LoraConfig (e.g. ``["relative_k_proj"]`` for an adapter
    that stock vLLM can serve: that audio linear acts on positions; the plugin applies it per audio item).

    ``target_parameters`` (e.g. ``["experts.gate_up_proj", "experts.down_proj"]`` on a MoE model)
    adds PEFT's LoRA on 3-D expert parameters, partitioned by ZeRO-3 like any other.

    ``dtype`` is the model/adapter dtype ("float32" or "bfloat16"); DeepSpeed keeps fp32 master
    weights in the checkpoint either way. Raises ``RuntimeError`` with the workers' output tail
    if the job fails.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Worker arguments travel in the environment: torch.distributed.run would parse "--r" as its own.
    payload = json.dumps(
        {"model_dir": str(model_dir), "out": str(out), "steps": steps, "r": r, "lora_alpha": lora_alpha, "dtype": dtype,
         "exclude_modules": exclude_modules, "target_parameters": target_parameters}
    )  # fmt: skip
    proc = launch_cpu_ranks(["-m", "gemma4_bridge.testing.zero3_job"], world_size=world_size, env={_WORKER_ENV: payload}, timeout_s=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"ZeRO-3 job failed (exit {proc.returncode}):\n{failure_report(proc)}")
    damaged = out / f"checkpoint-{steps}"
    return Zero3JobResult(out, damaged, damaged, out / "reference_adapter", steps, world_size)


def launch_cpu_ranks(
    entry: list[str], *, world_size: int, env: dict[str, str] | None = None, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``entry`` (``["-m", "module"]`` or ``[script, *args]``) as ``world_size`` local CPU ranks.

    torch.distributed.run on 127.0.0.1 with one OpenMP thread per rank and DeepSpeed's CPU
    accelerator: what a real multi-rank ZeRO-3 job needs on a box without GPUs. Each rank's output
    is captured on its own (torchrun ``--redirects``) and returned with every line tagged
    ``[rank R]``, then torchrun's own, so a rank that dies in native code (a signal, no Python
    traceback) still shows its last words (:func:`failure_report`).

    A job whose rank was killed by a signal (a crash in gloo or DeepSpeed's native code, never a
    Python error or a failed check: those exit 1) is run once more, with a ``RuntimeWarning``
    carrying the first run's report, so a rare native crash neither hides nor fails a test alone.
    """
    full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **(env or {}))
    full_env.setdefault("DS_ACCELERATOR", "cpu")
    proc = _launch_once(entry, world_size, full_env, timeout_s)
    died_by = _rank_signal(proc)
    if died_by is None:
        return proc
    warnings.warn(f"a rank died by signal {died_by}; running the job once more. First run:\n{failure_report(proc)}",
                  RuntimeWarning, stacklevel=2)  # fmt: skip
    return _launch_once(entry, world_size, full_env, timeout_s)


def _launch_once(entry: list[str], world_size: int, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="gemma4-bridge-ranks-") as logs:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}", f"--master_port={_free_port()}",
            "--master_addr=127.0.0.1", f"--log-dir={logs}", "--redirects=3", *entry,
        ]  # fmt: skip
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as job:
            try:
                stdout, stderr = job.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _stop(job)
                raise
        ranks: dict[str, list[str]] = {"stdout": [], "stderr": []}
        for stream in ranks:
            for log in sorted(Path(logs).glob(f"*/attempt_*/*/{stream}.log")):
                rank = log.parent.name
                ranks[stream] += [f"[rank {rank}] {line}" for line in log.read_text(errors="replace").splitlines()]
    return subprocess.CompletedProcess(cmd, job.returncode, "\n".join([*ranks["stdout"], stdout]), "\n".join([*ranks["stderr"], stderr]))


def _stop(job: subprocess.Popen[str]) -> None:
    """Stop a timed-out job and its ranks: SIGTERM makes torchrun stop the ranks it started in their own
    sessions (a SIGKILL of torchrun alone left them running, orphaned); SIGKILL to its group if it hangs."""
    job.terminate()
    try:
        job.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()


def _rank_signal(proc: subprocess.CompletedProcess[str]) -> str | None:
    """The signal that killed a rank (torchrun reports ``Signal 6 (SIGABRT) received``), if any did."""
    if proc.returncode == 0:
        return None
    found = re.search(r"Signal \d+ \((SIG\w+)\) received", proc.stderr)
    return found.group(1) if found and found.group(1) != "SIGTERM" else None  # SIGTERM: torchrun stopping the others


def failure_report(proc: subprocess.CompletedProcess[str], lines_per_rank: int = 30) -> str:
    """The last lines each rank printed, then torchrun's verdict: what a failed job's error shows."""
    by_rank: dict[str, list[str]] = {}
    own: list[str] = []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        found = re.match(r"\[rank (\d+)\] ", line)
        (by_rank.setdefault(found.group(1), []) if found else own).append(line)
    verdict = [line.strip() for line in own if re.search(r"exitcode|Signal \d+|rank\s*:|error_file|traceback", line)]
    parts = ["\n".join(lines[-lines_per_rank:]) for _, lines in sorted(by_rank.items())]
    return "\n".join([*parts, *(verdict or own[-20:])])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    model_dir: Path, out: Path, steps: int, r: int, lora_alpha: int, dtype: str, exclude_modules: list[str] | None,
    target_parameters: list[str] | None = None,
) -> None:
    """One rank: PEFT all-linear LoRA, ZeRO-3, a few AdamW steps on random text."""
    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model

    from gemma4_bridge.testing.fixtures import load_tiny_model

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    torch.manual_seed(0)  # identical init on every rank
    model = load_tiny_model(model_dir).to(getattr(torch, dtype))
    # init_lora_weights=False: B starts nonzero too, so every delta is nonzero and testable.
    lora = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules="all-linear", exclude_modules=exclude_modules, init_lora_weights=False,
        target_parameters=target_parameters,
    )
    peft_model = get_peft_model(model, lora)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=peft_model, optimizer=optimizer, config=ds_config)
    gen = torch.Generator().manual_seed(100 + rank)
    vocab = peft_model.config.text_config.vocab_size
    for _ in range(steps):
        ids = torch.randint(16, vocab, (1, 12), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    damaged = out / f"checkpoint-{steps}"
    if rank == 0:
        # The bug: save without gathering. Partitioned params are [0]-shaped placeholders.
        peft_model.save_pretrained(damaged, safe_serialization=True)
    torch.distributed.barrier()
    engine.save_checkpoint(str(damaged), tag=f"global_step{steps}")
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):
        if rank == 0:
            peft_model.save_pretrained(out / "reference_adapter", safe_serialization=True)
    if rank == 0:
        from safetensors import safe_open

        with safe_open(str(damaged / "adapter_model.safetensors"), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        record = {
            "steps": steps,
            "world_size": world,
            "dtype": dtype,
            "persistence_threshold": PERSISTENCE_THRESHOLD,
            "damaged_tensors": sorted(k for k, s in shapes.items() if 0 in s),
            "intact_tensors": sorted(k for k, s in shapes.items() if 0 not in s),
        }
        (out / "job.json").write_text(json.dumps(record, indent=1))
    torch.distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--lora-alpha", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    if _WORKER_ENV in os.environ and argv is None:
        spec = json.loads(os.environ[_WORKER_ENV])
        _worker(
            Path(spec["model_dir"]), Path(spec["out"]), spec["steps"], spec["r"], spec["lora_alpha"], spec["dtype"],
            spec.get("exclude_modules"), spec.get("target_parameters"),
        )  # fmt: skip
        return 0
    args = parser.parse_args(argv)
    result = run_zero3_job(
        args.model_dir, args.out_dir, steps=args.steps, world_size=args.world_size,
        r=args.r, lora_alpha=args.lora_alpha, dtype=args.dtype,
    )  # fmt: skip
    print(f"damaged adapter + DeepSpeed checkpoint: {result.damaged_adapter}")
    print(f"reference (gathered) adapter:          {result.reference_adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def write_synthetic_zero3_checkpoint(
    params: dict[str, object],
    ckpt_dir: str | os.PathLike[str],
    *,
    world_size: int,
    step: int = 1,
    num_groups: int = 1,
    adam_states: bool = False,
) -> Path:
    """Write a checkpoint in DeepSpeed ZeRO-3's on-disk format for ``params`` (name -> tensor), no training.

    For benchmarks and multi-rank tests where a real run is too slow: same files, keys and
    partitioning as ``engine.save_checkpoint`` (DeepSpeed's own ``zero_to_fp32`` reads it; a test
    checks that). Params are split into ``num_groups`` optimizer groups in order; ``adam_states``
    adds exp_avg/exp_avg_sq of the same size, as a real checkpoint has. Returns the tag directory.
    """
    import math
    from collections import OrderedDict

    import torch

    from gemma4_bridge.converters.zero3 import (
        FLAT_GROUPS,
        LATEST_FILE,
        OPTIMIZER_STATE,
        PARAM_SHAPES,
        PARTITION_COUNT,
        RANK_FILE,
        STEP_DIR,
        ZERO_STAGE,
    )

    root = Path(ckpt_dir)
    tag = STEP_DIR.format(step=step)
    tag_dir = root / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    names = list(params)
    bounds = [round(i * len(names) / num_groups) for i in range(num_groups + 1)]
    groups = [names[bounds[g] : bounds[g + 1]] for g in range(num_groups)]
    param_shapes = [OrderedDict((n, torch.Size(params[n].shape)) for n in group) for group in groups]  # type: ignore[attr-defined]
    for rank in range(world_size):
        flats = []
        for group in groups:
            chunks = []
            for n in group:
                flat = params[n].detach().float().reshape(-1)  # type: ignore[attr-defined]
                chunk = math.ceil(flat.numel() / world_size)
                padded = torch.nn.functional.pad(flat, (0, chunk * world_size - flat.numel()))
                chunks.append(padded[rank * chunk : (rank + 1) * chunk])
            flats.append(torch.cat(chunks) if chunks else torch.zeros(0))
        inner = {"state": {g: {"exp_avg": f.clone(), "exp_avg_sq": f.clone(), "step": torch.tensor(float(step))} for g, f in enumerate(flats)}} if adam_states else {}
        optim = {
            OPTIMIZER_STATE: {
                ZERO_STAGE: 3,
                "loss_scaler": None,
                "dynamic_loss_scale": False,
                "overflow": False,
                PARTITION_COUNT: world_size,
                "optimizer_state_dict": inner,
                FLAT_GROUPS: flats,
            },
            "ds_version": "0.19.8",
        }
        torch.save(optim, tag_dir / RANK_FILE.format(rank=rank, mp=0, kind="optim"))
        model_states = {
            "module": OrderedDict(),
            "buffer_names": [],
            "optimizer": None,
            PARAM_SHAPES: param_shapes,
            "frozen_param_shapes": OrderedDict(),
            "shared_params": {},
            "frozen_param_fragments": OrderedDict(),
            "dp_world_size": world_size,
            "mp_world_size": 1,
            "ds_version": "0.19.8",
        }
        torch.save(model_states, tag_dir / RANK_FILE.format(rank=rank, mp=0, kind="model"))
    (root / LATEST_FILE).write_text(tag)
    return tag_dir
