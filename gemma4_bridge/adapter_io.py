"""Reading and writing PEFT adapter directories safely.

Reading: safetensors first, streamed with ``safe_open`` (mmap); pickle files (``.bin``/``.pt``) only
through ``torch.load(weights_only=True)`` with an explicit allow-list, never a blind unpickle.
Writing: through :mod:`gemma4_bridge.output` (a temporary sibling directory renamed into place, so
a crash or a signal leaves nothing half-made and an existing output is replaced only when asked).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma4_bridge.errors import BridgeError
from gemma4_bridge.layout import read_safetensors_header
from gemma4_bridge.output import atomic_output_dir, staged_files  # noqa: F401 - re-exported for writers that import them from here

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
METADATA_KEY = "gemma4_bridge"


def safe_torch_load(path: Path, *, extra_globals: Sequence[Any] = (), mmap: bool = False, map_location: str = "cpu") -> Any:
    """Load a pickle checkpoint with ``weights_only=True`` and only the globals a checkpoint needs.

    ``extra_globals`` widens the allow-list for one known file format (e.g. inert stand-ins for the
    classes a DeepSpeed checkpoint names); ``mmap`` leaves tensor data on disk until touched;
    ``map_location="meta"`` reads no tensor data at all (storages carry their file offset).
    """
    import torch

    allowed: list[Any] = [dict, list, tuple, set, int, float, str, bool, type(None), *extra_globals]
    with contextlib.suppress(ImportError):
        from collections import OrderedDict

        allowed.append(OrderedDict)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise BridgeError(
            f"{path}: refused to load this pickle file ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}).",
            fix="pickles are read only with weights_only=True and a fixed allow-list; if this file is yours, "
            "re-save it as safetensors (safetensors.torch.save_file)",
        ) from exc


@dataclass
class AdapterDir:
    """An adapter directory on disk: its config and where its tensors live."""

    path: Path
    config: dict[str, Any]
    weights: Path
    is_pickle: bool

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> AdapterDir:
        root = Path(path)
        if not root.exists():
            raise BridgeError(f"{root}: no such file or directory.", fix="pass the adapter directory PEFT saved")
        if root.is_file():
            raise BridgeError(
                f"{root}: is a file; an adapter is a directory with {CONFIG_NAME} and {SAFETENSORS_NAME}.",
                fix="pass the directory that contains it",
            )
        return cls(root, read_adapter_config(root), *_find_weights(root))

    @property
    def safetensors_metadata(self) -> dict[str, str]:
        if self.is_pickle:
            return {}
        return read_safetensors_header(self.weights).get("__metadata__") or {}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """{key: shape} without reading tensor data (pickles must be loaded, safetensors need not)."""
        if self.is_pickle:
            return {k: tuple(v.shape) for k, v in self._pickle_state().items()}
        header = read_safetensors_header(self.weights)
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}

    def iter_tensors(self) -> Iterator[tuple[str, Any]]:
        """Yield (key, tensor) one at a time, memory-mapped for safetensors."""
        if self.is_pickle:
            yield from self._pickle_state().items()
            return
        from safetensors import safe_open

        try:
            with safe_open(str(self.weights), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield key, f.get_tensor(key)
        except Exception as exc:
            if isinstance(exc, BridgeError):
                raise
            raise BridgeError(
                f"{self.weights}: could not read tensors ({exc}).",
                fix="the file is truncated or corrupt; copy it again from where it was trained",
            ) from exc

    def _pickle_state(self) -> dict[str, Any]:
        import torch

        state = safe_torch_load(self.weights)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BridgeError(
                f"{self.weights}: expected a flat {{name: tensor}} state dict.",
                fix="save the adapter with PEFT's save_pretrained",
            )
        return state


def read_adapter_config(root: Path) -> dict[str, Any]:
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        listing = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "empty directory"
        raise BridgeError(
            f"{root}: no {CONFIG_NAME} (found: {listing}).",
            fix="point at the directory written by PEFT's save_pretrained, which holds adapter_config.json",
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BridgeError(f"{config_path}: not valid JSON ({exc}).", fix="restore adapter_config.json") from exc
    if not isinstance(config, dict) or "r" not in config:
        raise BridgeError(
            f"{config_path}: not a LoRA adapter config (no 'r').",
            fix="gemma4-bridge handles PEFT LoRA adapters; check peft_type is LORA",
        )
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise BridgeError(f"{config_path}: peft_type is {config.get('peft_type')!r}.", fix="only LoRA adapters are supported")
    return config


def _find_weights(root: Path) -> tuple[Path, bool]:
    st = root / SAFETENSORS_NAME
    if st.is_file():
        return st, False
    for name in PICKLE_NAMES:
        if (root / name).is_file():
            return root / name, True
    raise BridgeError(
        f"{root}: no {SAFETENSORS_NAME} (nor {', '.join(PICKLE_NAMES)}).",
        fix="the adapter weights are missing; save them with PEFT's save_pretrained",
    )


def write_adapter(out_dir: Path, config: dict[str, Any], tensors: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Write a canonical PEFT adapter into ``out_dir`` (a directory from :func:`atomic_output_dir`)."""
    from safetensors.torch import save_file

    st_meta = {"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / SAFETENSORS_NAME), metadata=st_meta)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
