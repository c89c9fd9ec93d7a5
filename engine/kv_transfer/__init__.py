"""KV transfer between engines: the connector interface, the block format, and the built-in connectors.

Submodules, imported on demand so that light users (the router) never load torch, grpc or redis:

- :mod:`.base` — the two connector halves and the data between them; :mod:`.registry` — connectors by name
- :mod:`.block_format` — the versioned, checksummed block object; :mod:`.kv_layout` — cache <-> payload (torch)
- :mod:`.store_connector` over :mod:`.shared_fs` and :mod:`.redis_connector`; :mod:`.grpc_connector` with
  :mod:`.grpc_kv_server`
- :mod:`.metrics` — counters and their Prometheus collector (``pdserve bench kv-transfer`` lives in bench/)
"""
