"""pdserve.engine.core: the scheduler side of the engine, pure Python and torch-free.

Block hashes (``block_hash``), the block pool and its free queue, the KV cache manager, the scheduler and its
output types (``sched_output``), stop conditions and KV events. Tested to the block id on a CPU.

May import: itself, ``pdserve.engine.config``, ``request``, ``sampling_params``, ``outputs`` and the connector
contract in ``pdserve.engine.kv_transfer`` (scheduler halves); never torch or numpy (tests/test_no_torch_imports.py).
"""
