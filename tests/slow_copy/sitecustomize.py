"""Test-only: on PYTHONPATH of the test server (tests/test_vllm_server.py), slows the vLLM plugin's
snapshot copy of adapters whose directory name starts with ``slow-`` by
``GEMMA4_BRIDGE_TEST_SLOW_COPY_S`` seconds and logs each such copy to ``GEMMA4_BRIDGE_TEST_SLOW_LOG``,
so a test can tell, deterministically, whether the server keeps answering while a large adapter is
copied and checked, and how many copies concurrent requests made. Other adapters are untouched."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

_TARGET = "gemma4_bridge.plugins.vllm.snapshot"


class _PatchSnapshotCopy(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            real = module._copy

            def slow_copy(src: Path, dst: Path) -> None:
                if src.name.startswith("slow-"):
                    with open(os.environ["GEMMA4_BRIDGE_TEST_SLOW_LOG"], "a") as log:
                        log.write(f"{src.name} {os.getpid()} {time.time():.3f}\n")
                    time.sleep(float(os.environ["GEMMA4_BRIDGE_TEST_SLOW_COPY_S"]))
                real(src, dst)

            module._copy = slow_copy

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("GEMMA4_BRIDGE_TEST_SLOW_COPY_S"):
    sys.meta_path.insert(0, _PatchSnapshotCopy())
