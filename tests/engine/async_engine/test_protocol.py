"""The core <-> client wire messages survive msgpack unchanged (the engine's own dataclasses included)."""

from __future__ import annotations

from pdserve.engine.async_engine.protocol import (AbortRequests, AddRequests, FatalMessage, FinishRequests,
                                                  ReadyMessage, Shutdown, StepMessage, client_decoder,
                                                  client_encoder, core_decoder)
from pdserve.engine.core.sched_output import SchedulerStats
from pdserve.engine.engine_core import EngineCoreRequest
from pdserve.engine.outputs import EngineCoreOutput, Logprob
from pdserve.engine.sampling_params import SamplingParams


def test_client_messages_round_trip():
    enc, dec = client_encoder(), core_decoder()
    req = EngineCoreRequest("r-1", [1, 2, 3], SamplingParams(n=1, temperature=0.0, stop=["x"], max_tokens=7,
                                                             logprobs=2, seed=5), arrival_time=12.5,
                            eos_token_id=2)
    for msg in (AddRequests([req]), AbortRequests(["a", "b"]), FinishRequests(["c"]), Shutdown()):
        assert dec.decode(enc.encode(msg)) == msg
    back = dec.decode(enc.encode(AddRequests([req]))).requests[0]
    assert isinstance(back.sampling_params, SamplingParams) and back.sampling_params.stop == ["x"]


def test_core_messages_round_trip():
    enc, dec = client_encoder(), client_decoder()
    stats = SchedulerStats(1, 2, 0.25, 3, 4, 10, 5, 0)
    out = EngineCoreOutput("r-1", [9], [[Logprob(9, -0.1, 1), Logprob(8, -2.0, 2)]], "length", None, 16)
    msgs = [ReadyMessage(100, 512, 64, 16), FatalMessage("boom", "tb"),
            StepMessage(1.5, [out], [("r-1", 1.25)], [("r-2", "bad")], stats, 12)]
    for msg in msgs:
        assert dec.decode(enc.encode(msg)) == msg


def test_invalid_sampling_params_are_refused_on_decode():
    # The core re-validates: a client that skipped validation cannot smuggle bad values in.
    import msgspec
    import pytest

    raw = client_encoder().encode(AddRequests([EngineCoreRequest("r", [1], SamplingParams())]))
    obj = msgspec.msgpack.decode(raw)
    obj[1][0]["sampling_params"]["top_p"] = 7.0
    with pytest.raises((ValueError, msgspec.ValidationError)):
        core_decoder().decode(msgspec.msgpack.encode(obj))
