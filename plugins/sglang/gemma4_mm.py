"""Entry module for ``SGLANG_EXTERNAL_MODEL_PACKAGE=gemma4_bridge.plugins.sglang``.

SGLang's registry imports each submodule of that package and registers its ``EntryClass`` by
class name, replacing the built-in ``Gemma4ForConditionalGeneration`` and
``Gemma4UnifiedForConditionalGeneration``.
"""

from . import load_entry_class
from .upstream import UPSTREAM_MODELS

EntryClass = [load_entry_class(arch) for arch in UPSTREAM_MODELS]
