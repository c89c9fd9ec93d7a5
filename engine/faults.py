"""Which exceptions end the engine and which end only the request that caused them.

The engine core's rule (docs/architecture.md, "a request's failure is that request's"): an error raised while
serving a request aborts that request with the error's text and frees its blocks; the engine keeps serving. Only
a device fault is fatal, because after one the device's memory (the KV cache of every request) can no longer be
trusted: CUDA errors (an illegal address, a device-side assert), running out of device memory, and running out
of host memory. Torch reports CUDA errors as ``RuntimeError`` (``torch.AcceleratorError`` in newer versions)
whose text names CUDA, so they are recognized by type and text.
"""

from __future__ import annotations

# Substrings of the messages torch and its libraries give device failures.
_DEVICE_MARKERS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error",
                   "device-side assert", "illegal memory access", "NCCL error", "HIP error")


def is_device_fault(exc: BaseException) -> bool:
    """True for an error after which the engine must not serve again (see the module docstring)."""
    if isinstance(exc, MemoryError):
        return True
    # ExecutorFailedError: a worker process of a parallel engine died (engine/executor/multiproc.py).
    if type(exc).__name__ in ("OutOfMemoryError", "AcceleratorError", "ExecutorFailedError"):
        return True
    text = str(exc)
    return any(marker in text for marker in _DEVICE_MARKERS)


def describe(exc: BaseException) -> str:
    """A one-line, client-safe description of a request's failure (type and message, no traceback)."""
    text = " ".join(str(exc).split())[:500]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
