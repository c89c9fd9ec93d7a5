"""The pooling runner (``--runner pooling``): prefill-only requests whose result is a pooled hidden state.

See :mod:`.runner` (one batch of prompts to embeddings) and :mod:`.async_pooler` (the engine client that batches
concurrent requests onto it).
"""
