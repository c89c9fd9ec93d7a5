"""pdserve.engine.models: model definitions (the Llama family, Qwen2, Qwen3) and their registry by architecture.

May import: torch, ``pdserve.kernels``, ``pdserve.engine.worker`` (attention backends) and the engine's config.
"""
