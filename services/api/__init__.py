"""The OpenAI-compatible HTTP API, the gRPC API and the Prometheus metrics shared by every serving role.

``build_app(engine, settings, metrics)`` (:mod:`.app`) and ``start_grpc_server(engine, settings, host, port)``
(:mod:`.grpc_server`) take any :class:`~.engine_client.EngineClient`: the monolithic server passes an
``AsyncLLM``; the router and the disaggregated roles pass their own clients (or add gRPC services) and get the
same API, validation and error mapping. ``pdserve serve`` is :mod:`.cli`.

May import: ``pdserve.engine.*``, ``pdserve.proto``, ``pdserve.cli.engine_args``; never another service.
"""
