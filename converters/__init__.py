"""Offline adapter surgery: ZeRO-3 recovery, name remapping, merge (installed as ``gemma4_bridge.converters``)."""
