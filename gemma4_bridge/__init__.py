"""gemma4-bridge: Gemma 4 LoRA adapters that serve exactly what was trained, or fail clearly."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gemma4-bridge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
