"""The ``grpc`` connector: prefill pods serve finished prompts' blocks from their KV cache, decode pods pull them.

:mod:`.scheduler` (torch-free, grpc-free) holds transfers under a lease (:mod:`.transfers`); :mod:`.worker` runs
the KV server (:mod:`.kv_server`) and pulls with :mod:`.client`, over the stream or CUDA IPC (:mod:`.cuda_ipc`).
May import the contract one level up, never :mod:`pdserve.engine.kv_transfer.stores`."""
