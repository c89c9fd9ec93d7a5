"""pdserve.engine.worker: what runs on the device: the model runner, KV cache tensors, input batches, attention
backends (torch and Triton), CUDA graphs and warm-up.

May import: torch, ``pdserve.kernels``, ``pdserve.engine.*`` (models, model_loader, core's output types).
"""
