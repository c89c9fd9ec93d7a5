"""pdserve.proto: the gRPC/protobuf contracts (``pdserve/v1/*.proto``), their committed generated code, and
``regen`` (``python -m pdserve.proto.regen [--check]``).

May import: grpc and protobuf only.
"""
