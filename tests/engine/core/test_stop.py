"""Stop conditions on token ids, as a table."""

from __future__ import annotations

import pytest

from pdserve.engine.core.stop import StopDecision, check_stop
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams

EOS = 2
STOP, LEN = RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH


def request(outputs: list[int], prompt_len: int = 4, **params) -> Request:
    r = Request("r", [7] * prompt_len, SamplingParams(**params), eos_token_id=EOS)
    r.output_token_ids = list(outputs)
    return r


@pytest.mark.parametrize("outputs, params, max_model_len, expected", [
    ([5], {}, 100, None),
    ([], {}, 100, None),  # nothing sampled yet
    ([5, EOS], {}, 100, StopDecision(STOP, None)),
    ([5, EOS], {"ignore_eos": True}, 100, None),
    ([EOS], {"min_tokens": 2, "max_tokens": 5}, 100, None),  # EOS too early: keep going
    ([5, EOS], {"min_tokens": 2, "max_tokens": 5}, 100, StopDecision(STOP, None)),
    ([5, 9], {"stop_token_ids": [9]}, 100, StopDecision(STOP, 9)),
    ([9], {"stop_token_ids": [9], "min_tokens": 2, "max_tokens": 5}, 100, None),
    ([9], {"stop_token_ids": [9], "ignore_eos": True}, 100, StopDecision(STOP, 9)),  # ignore_eos is EOS only
    ([5, 5, 5], {"max_tokens": 3}, 100, StopDecision(LEN, None)),
    ([5, 5, 9], {"max_tokens": 3, "stop_token_ids": [9]}, 100, StopDecision(STOP, 9)),  # stop beats length
    ([5, 5], {"max_tokens": 3}, 100, None),
    ([5, 5], {"max_tokens": None}, 6, StopDecision(LEN, None)),  # 4 prompt + 2 outputs fill the context
    ([5], {"max_tokens": None}, 6, None),
    ([5, 5], {"min_tokens": 5, "max_tokens": 9}, 6, StopDecision(LEN, None)),  # the context beats min_tokens
    ([5, EOS], {}, 6, StopDecision(STOP, None)),  # EOS on the last slot is a stop, not a length
])
def test_check_stop(outputs, params, max_model_len, expected):
    assert check_stop(request(outputs, **params), max_model_len) == expected


def test_eos_is_ignored_when_the_request_has_none():
    r = Request("r", [1], SamplingParams(), eos_token_id=None)
    r.output_token_ids = [EOS]
    assert check_stop(r, 100) is None
