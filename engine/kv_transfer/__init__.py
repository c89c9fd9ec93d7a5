"""KV transfer between engines: the connector contract at the top, the connectors in two rooms below it.

Submodules, imported on demand so that light users (the router) never load torch, grpc or redis:

- the contract: :mod:`.base` (the two connector halves and the data between them), :mod:`.block_format` (the
  versioned, checksummed block object and the transfer handle format), :mod:`.kv_layout` (cache <-> payload,
  torch), :mod:`.metrics`, :mod:`.registry` / :mod:`.factory` (connectors by name), :mod:`.options` (CLI flags),
  :mod:`.connector_scheduler` and :mod:`.prompt_blocks` (the torch-free scheduler half every connector shares)
- :mod:`.stores` — ``shared-fs`` and ``redis`` stores and the connector over them
- :mod:`.grpc` — the ``grpc`` connector: scheduler half, worker half, KV server, pull client, CUDA IPC
- ``pdserve bench kv-transfer`` lives in bench/
"""
