"""pdserve.proto.pdserve: the protobuf package ``pdserve`` (see ``proto/regen.py``)."""
