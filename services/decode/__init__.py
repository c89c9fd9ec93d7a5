"""pdserve.services.decode: the decode pod (``pdserve decode``): the API server plus the streaming ``Decode`` gRPC
call that loads a prefill pod's KV.

May import: ``pdserve.services.api``, ``pdserve.services.prefill`` (role start-up), ``pdserve.engine.*``,
``pdserve.proto``.
"""
