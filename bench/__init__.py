"""pdserve.bench: every benchmark, behind ``pdserve bench <kind>`` (pdserve/cli/bench.py lists the kinds).

Offline engine benchmarks (``throughput``, ``latency``, ``decode_profile``, with a transformers peer in
``hf_peer`` and the roofline in ``roofline``), the online serving benchmark (``serve`` over ``client``,
``datasets``, ``runner``, ``metrics``, ``plots``), the KV-transfer benchmark (``kv_transfer``) and the kernel
micro-benchmarks (``kernels``, ``gemv``).

May import: every other pdserve package (it measures them). Nothing in the product imports this package except the
``pdserve bench`` command.
"""
