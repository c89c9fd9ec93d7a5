"""Model resolution and loading.

- :func:`resolve_model` turns a bundled name, a local Hugging Face directory or a dummy shape preset into a
  :class:`ResolvedModel` (local paths + transformers config). Bundled models are cached under
  ``$PDSERVE_CACHE_DIR`` (default ``~/.cache/pdserve``).
- :func:`load_model` builds our model on a device and fills its weights.

May import: torch, transformers, safetensors, gguf, ``pdserve.engine.models`` and ``pdserve.engine.worker``.
"""

from pdserve.engine.model_loader.resolve import ResolvedModel, resolve_model
from pdserve.engine.model_loader.weights import load_model, resolve_device, resolve_dtype

__all__ = ["ResolvedModel", "load_model", "resolve_device", "resolve_dtype", "resolve_model"]
