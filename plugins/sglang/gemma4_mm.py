"""Entry module for ``SGLANG_EXTERNAL_MODEL_PACKAGE=gemma4_bridge.plugins.sglang``.

SGLang's registry imports each submodule of that package and registers its ``EntryClass`` by
class name, replacing the built-in ``Gemma4ForConditionalGeneration``.
"""

from . import load_entry_class

EntryClass = load_entry_class()
