"""AsyncLLM against a real engine-core process running the model-free mock core (real scheduler, real sockets)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from pdserve.engine.async_engine.client import AsyncLLM, EngineDeadError, QueueFullError
from tests.helpers.mock_core import make_mock_core, make_slow_mock_core, mock_next_token
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(60)

VOCAB = 1000  # the mock core's vocabulary when the model has no HF config


def mock_config(max_model_len: int = 256, num_blocks: int = 64) -> EngineConfig:
    return EngineConfig(model=ModelConfig(model="mock", max_model_len=max_model_len, served_model_name="mock"),
                        cache=CacheConfig(num_blocks=num_blocks, block_size=16))


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(mock_next_token(seq, VOCAB))
    return seq[len(prompt):]


class Recorder:
    def __init__(self) -> None:
        self.stats, self.iterations = [], []

    def record(self, stats, it) -> None:
        if stats is not None:
            self.stats.append(stats)
        self.iterations.append(it)


async def wait_idle(llm: AsyncLLM, timeout: float = 5.0) -> None:
    """Until the core reports no running or waiting sequence and no used block."""
    for _ in range(int(timeout / 0.02)):
        s = llm.get_stats()
        if s is not None and s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0.0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: {llm.get_stats()}")


async def test_streams_tokens_and_finishes():
    rec = Recorder()
    async with AsyncLLM(mock_config(), core_factory=make_mock_core, stat_loggers=[rec]) as llm:
        assert llm.is_ready and llm.vocab_size == VOCAB
        outs = [o async for o in llm.generate([5, 6, 7], SamplingParams(max_tokens=6, temperature=0))]
        assert [t for o in outs for t in o.outputs[0].token_ids] == expected_tokens([5, 6, 7], 6)
        assert [o.outputs[0].finish_reason for o in outs] == [None] * 5 + ["length"]
        await wait_idle(llm)
    finished = [f for it in rec.iterations for f in it.finished]
    assert len(finished) == 1 and finished[0].finish_reason == "length"
    f = finished[0]
    assert f.num_generation_tokens == 6 and f.num_prompt_tokens == 3
    assert f.queue_time is not None and f.prefill_time is not None and f.decode_time is not None
    assert sum(it.num_generation_tokens for it in rec.iterations) == 6
    assert sum(len(it.time_to_first_tokens) for it in rec.iterations) == 1
    assert sum(it.num_step_tokens for it in rec.iterations) >= 3 + 5


async def test_n_sequences_and_non_streaming():
    async with AsyncLLM(mock_config(), core_factory=make_mock_core) as llm:
        outs = [o async for o in llm.generate([1, 2], SamplingParams(n=3, max_tokens=4), stream=False)]
        assert sorted(o.outputs[0].index for o in outs) == [0, 1, 2]
        for o in outs:  # non-streamed: one whole output per sequence
            assert o.outputs[0].token_ids == expected_tokens([1, 2], 4)
            assert o.finished


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "empty"),
    (list(range(1, 300)), SamplingParams(), "context"),
    ([1, VOCAB + 5], SamplingParams(), "vocabulary"),
    ([1, 2], SamplingParams(max_tokens=255), "exceeds"),
    ("text", SamplingParams(), "tokenizer"),
])
async def test_invalid_requests_raise_before_queueing(prompt, params, match):
    async with AsyncLLM(mock_config(), core_factory=make_mock_core) as llm:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, params)
        assert llm.num_unfinished_requests == 0
        # The engine still serves.
        assert [o async for o in llm.generate([3], SamplingParams(max_tokens=1))]


async def test_client_request_ids_are_labels_only():
    # Issue 11 (server-owned ids): the client's id no longer keys engine state, so two live requests may carry
    # the same label (this test asserted "already in use" before); each is served on its own and keeps its label.
    async with AsyncLLM(mock_config(), core_factory=make_slow_mock_core) as llm:
        a = llm.generate([1], SamplingParams(max_tokens=3), request_id="same")
        b = llm.generate([2], SamplingParams(max_tokens=3), request_id="same")
        assert a.internal_id != b.internal_id and "same" not in (a.internal_id, b.internal_id)
        outs_a, outs_b = [o async for o in a], [o async for o in b]
        assert {o.request_id for o in outs_a + outs_b} == {"same"}
        assert [t for o in outs_a for t in o.outputs[0].token_ids] == expected_tokens([1], 3)
        assert [t for o in outs_b for t in o.outputs[0].token_ids] == expected_tokens([2], 3)


async def test_closing_a_stream_aborts_and_frees_blocks():
    rec = Recorder()
    async with AsyncLLM(mock_config(), core_factory=make_slow_mock_core, stat_loggers=[rec]) as llm:
        stream = llm.generate(list(range(1, 40)), SamplingParams(max_tokens=200))
        await stream.__anext__()
        assert llm.get_stats().kv_cache_usage > 0
        stream.close()
        await wait_idle(llm)
        assert llm.num_unfinished_requests == 0
    assert [f.finish_reason for it in rec.iterations for f in it.finished] == ["abort"]


async def test_cancelling_the_consumer_task_aborts():
    async with AsyncLLM(mock_config(), core_factory=make_slow_mock_core) as llm:
        async def consume():
            async for _ in llm.generate(list(range(1, 40)), SamplingParams(max_tokens=200)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(llm)


async def test_abort_by_id_ends_the_iterator():
    async with AsyncLLM(mock_config(), core_factory=make_slow_mock_core) as llm:
        stream = llm.generate([1, 2, 3], SamplingParams(max_tokens=200), request_id="r")
        await stream.__anext__()
        await llm.abort("r")
        rest = [o async for o in stream]
        assert all(not o.finished for o in rest)
        await wait_idle(llm)


async def test_waiting_queue_limit():
    async with AsyncLLM(mock_config(), core_factory=make_slow_mock_core, max_waiting=2) as llm:
        first = llm.generate([1], SamplingParams(n=2, max_tokens=3))
        with pytest.raises(QueueFullError):
            llm.generate([2], SamplingParams(max_tokens=3))
        assert len([o async for o in first]) == 6
        # Once scheduled, the queue has room again.
        assert [o async for o in llm.generate([2], SamplingParams(max_tokens=2))]


async def test_many_concurrent_requests():
    async with AsyncLLM(mock_config(num_blocks=128), core_factory=make_mock_core) as llm:
        async def one(i: int) -> list[int]:
            return [t async for o in llm.generate([i + 1, 7], SamplingParams(max_tokens=5))
                    for t in o.outputs[0].token_ids]

        results = await asyncio.gather(*(one(i) for i in range(200)))
        assert all(r == expected_tokens([i + 1, 7], 5) for i, r in enumerate(results))
        await wait_idle(llm)


async def test_core_death_fails_pending_requests():
    llm = await AsyncLLM(mock_config(), core_factory=make_slow_mock_core).start()
    try:
        stream = llm.generate([1, 2], SamplingParams(max_tokens=200))
        await stream.__anext__()
        os.kill(llm._proc.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert not llm.is_ready and llm.dead_error is not None
        with pytest.raises(EngineDeadError):
            llm.generate([1], SamplingParams())
    finally:
        await llm.shutdown()


def _failing_core(config):
    raise RuntimeError("no weights here")


async def test_start_failure_is_reported():
    with pytest.raises(EngineDeadError, match="no weights here"):
        await AsyncLLM(mock_config(), core_factory=_failing_core).start()


async def test_shutdown_is_clean_and_idempotent():
    llm = await AsyncLLM(mock_config(), core_factory=make_mock_core).start()
    proc = llm._proc
    await llm.shutdown()
    await llm.shutdown()
    assert not proc.is_alive() and proc.exitcode == 0


async def test_kv_events_are_published_for_routers():
    import zmq
    import zmq.asyncio

    from pdserve.engine.kv_event_publisher import TOPIC, batch_decoder

    port = _free_port()
    config = EngineConfig(model=ModelConfig(model="mock", max_model_len=256, served_model_name="mock"),
                          cache=CacheConfig(num_blocks=64, block_size=16,
                                            kv_events_endpoint=f"tcp://127.0.0.1:{port}"))
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
    sub.connect(f"tcp://127.0.0.1:{port}")
    try:
        async with AsyncLLM(config, core_factory=make_mock_core) as llm:
            await asyncio.sleep(0.3)  # let the subscription reach the publisher
            assert [o async for o in llm.generate(list(range(1, 40)), SamplingParams(max_tokens=2))]
            stored, loads = 0, 0
            for _ in range(20):
                if not await sub.poll(2000):
                    break
                _, raw = await sub.recv_multipart()
                batch = batch_decoder().decode(raw)
                loads += batch.load is not None
                stored += sum(len(getattr(e, "block_hashes", [])) for e in batch.events
                              if type(e).__name__ == "StoredMsg")
                if stored >= 2:
                    break
            assert stored >= 2 and loads >= 1  # 39 prompt tokens fill two blocks of 16
    finally:
        sub.close(linger=0)
        ctx.term()


def _free_port() -> int:
    from pdserve.cli.local_servers import free_port

    return free_port()


async def test_a_request_refused_late_leaves_no_phantom_sequences():
    # Issue 11: seed = 2**64 used to raise (OverflowError, encoding the message) after the request's state was
    # registered; four of them under max_waiting=4 filled the waiting queue for good (429 forever).
    async with AsyncLLM(mock_config(), core_factory=make_mock_core, max_waiting=4) as llm:
        for _ in range(4):
            params = SamplingParams(max_tokens=3, seed=1)
            params.seed = 2 ** 64  # as a client's value that slipped past the first check
            with pytest.raises(ValueError, match="seed"):
                llm.generate([1, 2], params)
        assert llm.num_unfinished_requests == 0 and not llm._unscheduled and not llm._times
        assert len([o async for o in llm.generate([3], SamplingParams(max_tokens=2))]) == 2
