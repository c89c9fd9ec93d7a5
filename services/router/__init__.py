"""pdserve.services.router: the router (``pdserve router``): pod discovery and health, the prefix index fed by the
pods' KV events, the filter -> score -> pick pipeline with its plugins, request sequences (prefill then decode,
retries), and the same OpenAI/gRPC API as a pod through its own EngineClient (``engine``).

May import: ``pdserve.services.api``, ``pdserve.engine.*`` (torch-free parts only: tests/test_no_torch_imports.py),
``pdserve.proto``; never a pod role.
"""
