"""The committed generated gRPC code matches the .proto files (regenerate with ``python -m pdserve.proto.regen``)."""

from __future__ import annotations

from pdserve.proto import regen


def test_generated_code_is_current():
    assert regen.proto_files(), "no .proto files found"
    assert regen.stale_files() == [], "run: python -m pdserve.proto.regen"
