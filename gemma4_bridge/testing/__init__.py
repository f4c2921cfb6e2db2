"""Test scaffolding shipped with the package (tiny Gemma 4 checkpoints, real PEFT adapters, a real
DeepSpeed ZeRO-3 run): used by the tests, the demo, the examples and the benchmarks, never by the
converters, plugins or training wrapper themselves."""
