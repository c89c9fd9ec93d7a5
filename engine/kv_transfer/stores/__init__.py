"""Shared stores of KV blocks: the :class:`~.store.BlockStore` interface, the ``shared-fs`` and ``redis`` stores,
and the connector halves over them (:mod:`.scheduler` is torch-free; :mod:`.worker` moves the bytes).

May import the contract one level up (``base``, ``block_format``, ``kv_layout``, ``metrics``,
``connector_scheduler``, ``prompt_blocks``) and nothing of :mod:`pdserve.engine.kv_transfer.grpc`."""
