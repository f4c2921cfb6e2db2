"""Online serving plugins (installed as ``gemma4_bridge.plugins``)."""
