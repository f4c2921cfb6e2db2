"""Where an adapter's tensors come from: shapes first (headers), values one tensor at a time."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gemma4_bridge.adapter_io import AdapterDir
from gemma4_bridge.errors import BridgeError, ErrorCode

from .safetensors_stream import CODE_TO_DTYPE, SafetensorsReader

LORA_DTYPES = ("F32", "BF16", "F16", "F64")


class TensorSource:
    """Read-only access to the source adapter's tensors: shapes first, values one at a time."""

    def __init__(
        self,
        label: str,
        specs: Mapping[str, tuple[tuple[int, ...], str]],
        getter: Callable[..., Any],
        reader: SafetensorsReader | None = None,
    ):
        self.label = label
        self.specs = dict(specs)  # key -> (shape, torch dtype name)
        self._get = getter
        self.reader = reader  # set for safetensors files: reads can go into a reused buffer

    @classmethod
    def from_adapter_dir(cls, adapter: AdapterDir) -> TensorSource:
        if adapter.is_pickle:
            state = adapter._pickle_state()  # weights_only=True, allow-listed
            return cls.from_tensors(str(adapter.weights), state)
        reader = SafetensorsReader(adapter.weights)  # the header, read and checked once, through the descriptor kept
        header = reader.header
        specs: dict[str, tuple[tuple[int, ...], str]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info.get("dtype") not in LORA_DTYPES:
                reader.close()
                raise BridgeError(
                    f"{adapter.weights}: tensor {key} has dtype {info.get('dtype')}, not a LoRA weight dtype.",
                    fix="save LoRA weights in float32, bfloat16 or float16",
                )
            specs[key] = (tuple(info["shape"]), CODE_TO_DTYPE[info["dtype"]])

        def get(key: str, scratch: Any = None) -> Any:
            try:
                return reader.get(key, scratch)
            except (OSError, ValueError, KeyError) as exc:
                raise unreadable(adapter.weights, f"tensor {key}", exc) from exc

        return cls(str(adapter.weights), specs, get, reader)

    @classmethod
    def from_tensors(cls, label: str, tensors: Mapping[str, Any]) -> TensorSource:
        specs = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
        return cls(label, specs, tensors.__getitem__)

    def get(self, key: str, scratch: Any = None) -> Any:
        return self._get(key, scratch) if self.reader is not None else self._get(key)


def unreadable(weights: object, what: str, exc: Exception) -> BridgeError:
    """The error for a weights file whose bytes cannot be read as its header says."""
    return BridgeError(
        f"{weights}: could not read {what} ({exc}).",
        fix="the file is truncated or corrupt; copy it again from where it was trained",
        code=ErrorCode.UNREADABLE,
    )
