"""SGLang resolves Gemma 4 to gemma4-bridge's class through both routes, and never silently falls back.

The plugin route runs in this process: SGLang's ``load_plugins()`` (what every SGLang process does)
then its ``get_model_architecture`` (what the model loader does). The fallback route
(``SGLANG_EXTERNAL_MODEL_PACKAGE``) is read when SGLang's registry is first imported, so it runs in
a fresh interpreter, started as soon as collection ends so that it overlaps with other tests
(conftest.py, ``pytest_collection_finish``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace
from typing import Any

import pytest
from sglang_helpers import external_route_process

ARCH = "Gemma4ForConditionalGeneration"
OURS = "gemma4_bridge.plugins.sglang.model"
BROKEN_MESSAGE = "gemma4-bridge's SGLang Gemma 4 class failed to load"

def _external_report(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("REPORT")).removeprefix("REPORT")), err


def _resolve_with_sglang() -> type:
    from sglang.srt.configs.model_config import ModelImpl
    from sglang.srt.model_loader.utils import get_model_architecture

    config = SimpleNamespace(
        hf_config=SimpleNamespace(architectures=[ARCH]), quantization=None, model_impl=ModelImpl.AUTO, is_embedding_gemma=False
    )
    return get_model_architecture(config)[0]


@pytest.fixture(scope="module")
def plugins_loaded() -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()


def test_entry_point_is_in_sglangs_general_plugin_group() -> None:
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP

    ours = [ep.value for ep in entry_points(group=GENERAL_PLUGINS_GROUP) if ep.name == "gemma4_bridge"]
    assert GENERAL_PLUGINS_GROUP == "sglang.srt.plugins"
    assert ours == ["gemma4_bridge.plugins.sglang:register"]


def test_plugin_entry_point_resolves_our_class(plugins_loaded: None) -> None:
    from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration as Builtin

    cls = _resolve_with_sglang()
    assert (cls.__module__, cls.__name__) == (OURS, ARCH)
    assert issubclass(cls, Builtin) and cls is not Builtin


def test_plugin_route_import_error_is_visible(plugins_loaded: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """SGLang only logs import errors: we must never end up on the built-in class unannounced."""
    import gemma4_bridge.plugins.sglang as pkg
    from gemma4_bridge.errors import BridgeError

    monkeypatch.setattr(pkg, "_entry_classes", {})
    monkeypatch.setitem(sys.modules, "gemma4_bridge.plugins.sglang.model", None)  # import error inside the package
    try:
        with caplog.at_level(logging.ERROR):
            cls = _resolve_with_sglang()
        assert cls.__name__ == ARCH and cls.__module__ == "gemma4_bridge.plugins.sglang"
        with pytest.raises(BridgeError, match=BROKEN_MESSAGE) as err:
            cls(None)
        assert "ModuleNotFoundError" in str(err.value) or "ImportError" in str(err.value)
        assert "the SGLang Gemma 4 class could not be loaded" in caplog.text
    finally:
        monkeypatch.undo()
        pkg._entry_classes.clear()
        assert _resolve_with_sglang().__module__ == OURS  # restored for the other tests


def test_external_model_package_resolves_our_class(request: pytest.FixtureRequest) -> None:
    report, _ = _external_report(external_route_process(request.config))
    assert report["ok"] == {"module": OURS, "name": ARCH, "subclass_of_builtin": True}
    # The env route alone leaves SGLang's Unified config alias in place (the README says: keep the
    # plugin for the 12B Unified; test_family shows the Unified class then refuses, naming that).
    assert report["unified_config"] == "_Gemma4UnifiedConfigAlias"
    broken = report["broken"]
    assert broken["name"] == ARCH and not broken["subclass_of_builtin"], "fell back to SGLang's built-in class"
    assert BROKEN_MESSAGE in broken["construct_error"]


def test_unsupported_sglang_version_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from packaging.version import Version

    from gemma4_bridge.errors import BridgeError
    from gemma4_bridge.plugins.sglang import failing_class, upstream

    monkeypatch.setattr(upstream, "sglang_version", lambda: Version("0.6.1"))
    with pytest.raises(BridgeError) as err:
        upstream.require_supported_sglang()
    assert "supports sglang >=0.5.23,<0.5.24" in str(err.value) and "found sglang 0.6.1" in str(err.value)
    with pytest.raises(BridgeError, match="found sglang 0.6.1"):
        failing_class(err.value)()
