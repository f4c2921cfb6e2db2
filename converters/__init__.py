"""Offline adapter surgery: canonical names, ZeRO-3 recovery, merge (installed as ``gemma4_bridge.converters``).

Importing this package does not import torch; functions load it when they need tensor values.
``canonicalize`` is the one entry point the serving plugins share with ``convert``.
"""

from .canonical import canonicalize, find_layout, plan
from .peft_config import effective_rank_alpha, lora_scaling
from .plans import CanonicalPlan, Problem
from .convert import convert_adapter
from .inspect import InspectReport, inspect_adapter
from .merge import merge_adapter

__all__ = [
    "CanonicalPlan",
    "InspectReport",
    "Problem",
    "canonicalize",
    "convert_adapter",
    "effective_rank_alpha",
    "find_layout",
    "inspect_adapter",
    "lora_scaling",
    "merge_adapter",
    "plan",
]
