"""pdserve.proto.pdserve.v1: generated protobuf and gRPC code of ``pdserve.v1``.

Do not edit: ``python -m pdserve.proto.regen`` writes these files from the ``.proto`` files beside them.
"""
