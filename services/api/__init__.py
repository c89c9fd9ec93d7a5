"""The OpenAI-compatible HTTP API, the gRPC API and the Prometheus metrics shared by every serving role.

``build_app(engine, settings)`` (:mod:`.app`) and ``build_grpc_server(engine, settings)`` (:mod:`.grpc_server`)
take any :class:`~.engine_client.EngineClient`: the monolithic server passes an ``AsyncLLM``; the router and the
decode service can pass their own clients and get the same API, validation and error mapping.
"""
