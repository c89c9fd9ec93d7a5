"""pdserve.services.prefill: the prefill pod (``pdserve prefill``): the API server plus the ``Prefill`` gRPC call,
and ``role_server``, the start-up shared with the decode pod.

May import: ``pdserve.services.api``, ``pdserve.engine.*``, ``pdserve.proto``, ``pdserve.cli.engine_args``.
"""
