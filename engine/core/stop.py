"""Stop conditions on token ids (stop strings are matched on text by the front end)."""

from __future__ import annotations

from typing import NamedTuple

from pdserve.engine.request import Request, RequestStatus


class StopDecision(NamedTuple):
    status: RequestStatus  # FINISHED_STOPPED or FINISHED_LENGTH
    stop_reason: int | None  # the stop token id that ended the request; None for EOS and length


def check_stop(request: Request, max_model_len: int) -> StopDecision | None:
    """Whether the request is done after its latest output token, and why. Pure: changes nothing.

    In order: EOS (unless ``ignore_eos``) and ``stop_token_ids`` count only once ``min_tokens`` outputs exist;
    then ``max_tokens`` outputs, then ``max_model_len`` total tokens end it with ``FINISHED_LENGTH``. A stop
    token that is also the last allowed token reports as a stop, which is what the client asked for.
    """
    params = request.sampling_params
    num_out = request.num_output_tokens
    if num_out == 0:
        return None
    last = request.output_token_ids[-1]
    if num_out >= params.min_tokens:
        if not params.ignore_eos and request.eos_token_id is not None and last == request.eos_token_id:
            return StopDecision(RequestStatus.FINISHED_STOPPED, None)
        if last in params.stop_token_ids:
            return StopDecision(RequestStatus.FINISHED_STOPPED, last)
    if params.max_tokens is not None and num_out >= params.max_tokens:
        return StopDecision(RequestStatus.FINISHED_LENGTH, None)
    # The context limit overrides min_tokens: there is no room left for another token's KV.
    if request.num_tokens >= max_model_len:
        return StopDecision(RequestStatus.FINISHED_LENGTH, None)
    return None
