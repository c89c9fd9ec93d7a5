"""pdserve.services: the serving processes: ``api/`` (HTTP + gRPC front end over any EngineClient, ``pdserve
serve``), ``prefill/`` and ``decode/`` (the two pod roles), ``router/`` (the front door of a disaggregated
deployment).

May import: ``pdserve.engine.*``, ``pdserve.proto``, and each other as tests/test_import_boundaries.py lists (the
roles build on ``api``; the router never on a role).
"""
