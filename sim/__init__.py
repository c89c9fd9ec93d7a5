"""A GPU-less simulator of pdserve: engines whose steps take the time a cost model says, and clusters of them.

- :mod:`.cost_model` — per-step time from batched tokens and context, profiles per model and GPU (``profiles/``)
- :mod:`.core` — :class:`SimEngineCore`, the real scheduler and KV cache manager with a modelled step
- :mod:`.kv` — the simulated KV connector with fault injection
- :mod:`.engine_cli` — ``pdserve sim-engine``: a pod speaking the real HTTP/gRPC APIs and ``/metrics``
- :mod:`.cluster` and :mod:`.cluster_cli` — ``pdserve sim``: prefill and decode pods in virtual time
"""
