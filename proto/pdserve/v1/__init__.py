"""pdserve.proto.pdserve.v1: generated protobuf and gRPC code of ``pdserve.v1`` (do not edit; ``python -m pdserve.proto.regen``)."""
