"""pdserve.engine: the engine shared by every role (monolithic, prefill, decode).

Top level: the composite ``config``, ``request`` and ``sampling_params``, ``outputs``, ``validation``, the tokenizer
and incremental ``detokenizer``, ``output_processor``, the ``sampler``, ``engine_core`` (schedule -> execute ->
update), ``llm_engine`` and the offline ``llm`` API, ``kv_event_publisher`` and ``security`` (the cluster secret).
Sub-packages: ``core/`` (scheduler side, no torch), ``worker/`` (model runner, KV cache tensors, attention),
``models/``, ``model_loader/``, ``async_engine/`` (the core in its own process), ``kv_transfer/`` (connectors).

May import: ``pdserve.engine.*``, ``pdserve.kernels``, ``pdserve.proto``; never the services, the operator, the
CLI, the benchmarks or the tests (tests/test_import_boundaries.py).
"""
