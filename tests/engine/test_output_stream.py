"""OutputStream hands a reader that fell behind everything that waits for it as one output per sequence: exact
texts, token ids, logprob rows and finish, and nothing merged across sequences, errors or aborts."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.frontend.output_stream import ABORTED, OutputStream, merge_deltas
from pdserve.engine.outputs import CompletionOutput, Logprob, RequestOutput


class _Stream(OutputStream):
    def __init__(self, queue: asyncio.Queue, num_sequences: int = 1) -> None:
        super().__init__(queue, num_sequences, "internal")
        self.stopped = 0

    def _stop(self) -> None:
        self.stopped += 1


def _out(index: int, text: str, tokens: list[int], finish: str | None = None, logprobs=None, timing=None,
         prompt_logprobs=None) -> RequestOutput:
    comp = CompletionOutput(index=index, text=text, token_ids=tokens, finish_reason=finish, logprobs=logprobs,
                            cumulative_logprob=-float(sum(tokens)))
    return RequestOutput("r", None, [1, 2], outputs=[comp], finished=finish is not None, timing=timing,
                         prompt_logprobs=prompt_logprobs)


async def _drain(stream: OutputStream) -> list:
    return [out async for out in stream]


async def test_a_reader_that_keeps_up_gets_one_output_per_step():
    queue: asyncio.Queue = asyncio.Queue()
    stream = _Stream(queue)
    queue.put_nowait(_out(0, "a", [5]))
    first = await stream.__anext__()
    queue.put_nowait(_out(0, "b", [6], finish="stop"))
    second = await stream.__anext__()
    assert [(o.outputs[0].text, o.outputs[0].token_ids) for o in (first, second)] == [("a", [5]), ("b", [6])]
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    assert stream.stopped == 1


async def test_waiting_deltas_of_one_sequence_merge_into_one_output():
    queue: asyncio.Queue = asyncio.Queue()
    rows = [[Logprob(token_id=t, logprob=-0.5 * t, rank=1)] for t in (5, 6, 7)]
    queue.put_nowait(_out(0, "He", [5], logprobs=[rows[0]], timing={"first": 1.0}, prompt_logprobs=[None]))
    queue.put_nowait(_out(0, "ll", [6], logprobs=[rows[1]]))
    queue.put_nowait(_out(0, "o", [7], finish="length", logprobs=[rows[2]]))
    outs = await _drain(_Stream(queue))
    assert len(outs) == 1
    comp = outs[0].outputs[0]
    assert (comp.text, comp.token_ids, comp.finish_reason, comp.cumulative_logprob) == ("Hello", [5, 6, 7],
                                                                                        "length", -7.0)
    assert comp.logprobs == rows and outs[0].finished
    assert outs[0].timing == {"first": 1.0} and outs[0].prompt_logprobs == [None]


async def test_no_merge_across_sequences_errors_or_aborts():
    queue: asyncio.Queue = asyncio.Queue()
    for item in (_out(0, "a", [5]), _out(0, "b", [6]), _out(1, "x", [9]), _out(1, "y", [10], finish="stop"),
                 _out(0, "c", [7], finish="stop")):
        queue.put_nowait(item)
    got = [(o.outputs[0].index, o.outputs[0].text, o.outputs[0].token_ids) for o in await _drain(_Stream(queue, 2))]
    assert got == [(0, "ab", [5, 6]), (1, "xy", [9, 10]), (0, "c", [7])]

    queue = asyncio.Queue()
    stream = _Stream(queue)
    for item in (_out(0, "a", [5]), RuntimeError("engine failed")):
        queue.put_nowait(item)
    assert (await stream.__anext__()).outputs[0].text == "a"
    with pytest.raises(RuntimeError, match="engine failed"):
        await stream.__anext__()

    queue = asyncio.Queue()
    for item in (_out(0, "a", [5]), _out(0, "b", [6]), ABORTED):
        queue.put_nowait(item)
    assert [o.outputs[0].text for o in await _drain(_Stream(queue))] == ["ab"]


def test_merge_deltas_refuses_what_is_not_a_delta_of_the_same_sequence():
    assert merge_deltas(_out(0, "a", [5]), _out(1, "b", [6])) is None
    assert merge_deltas(_out(0, "a", [5]), ABORTED) is None
    assert merge_deltas(_out(0, "a", [5]), ValueError("x")) is None
    merged = merge_deltas(_out(0, "a", [5]), _out(0, "", [6]))
    assert merged.outputs[0].logprobs is None and merged.outputs[0].token_ids == [5, 6]
