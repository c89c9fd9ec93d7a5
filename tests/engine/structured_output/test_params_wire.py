"""The structured-output constraint on the protobuf wire: every kind round-trips exactly, with its prefix count."""

from __future__ import annotations

import pytest

from pdserve.engine.frontend.params_wire import pb_set_fields, sampling_from_pb, sampling_to_pb
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto.pdserve.v1 import generate_pb2 as pb


@pytest.mark.parametrize("spec", [
    {"json": {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"enum": ["x"]}}}},
    {"json_object": True},
    {"regex": "[a-z]+", "num_prefix_tokens": 2},
    {"choice": ["yes", "no"]},
    {"grammar": 'root ::= "a"+'},
])
def test_round_trip(spec: dict) -> None:
    params = SamplingParams(max_tokens=5, structured_outputs=spec)
    msg = sampling_to_pb(params)
    wire = pb.SamplingParams.FromString(msg.SerializeToString())
    assert sampling_from_pb(wire) == params


def test_unset_and_empty() -> None:
    assert sampling_from_pb(sampling_to_pb(SamplingParams())).structured_outputs is None
    empty = pb.SamplingParams(structured_outputs=pb.StructuredOutputs(num_prefix_tokens=1))
    with pytest.raises(ValueError, match="sets no constraint"):
        pb_set_fields(empty)
