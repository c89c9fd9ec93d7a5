"""The async engine's output loop lets other tasks (the streams' writers) run between the core's step messages,
even when many are already queued: a ZeroMQ receive of a queued message completes without suspending, so a loop
that only awaited ``recv`` would drain the whole backlog first, every stream silent meanwhile
(docs/performance.md, fifth session)."""

from __future__ import annotations

import asyncio

import msgspec
import zmq
import zmq.asyncio

from pdserve.engine.async_engine.client import AsyncLLM
from pdserve.engine.async_engine.protocol import StepMessage, client_decoder
from pdserve.engine.core.sched_output import SchedulerStats

STEPS = 50


async def test_other_tasks_run_between_queued_step_messages():
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    stats = SchedulerStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_free_blocks=1, num_total_blocks=1,
                           prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0)
    frame = msgspec.msgpack.encode(StepMessage(timestamp=0.0, outputs=[], scheduled=[], rejected=[], stats=stats,
                                               num_step_tokens=1))
    for _ in range(STEPS):
        await push.send(frame)
    while not await pull.poll(100):  # wait until the messages sit in the PULL socket's queue
        pass
    await asyncio.sleep(0.2)

    # The loop under test, with the rest of the client left out: each step handled records how often the
    # competing task has run so far.
    llm = AsyncLLM.__new__(AsyncLLM)
    llm._out_sock, llm._decoder, llm._resets = pull, client_decoder(), {}
    seen: list[int] = []
    ticks = 0
    llm._on_step = lambda msg: seen.append(ticks)

    async def writer() -> None:  # stands for the streams' writer tasks
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(writer())
    loop_task = asyncio.create_task(llm._output_loop())
    try:
        while len(seen) < STEPS:
            await asyncio.sleep(0.01)
    finally:
        loop_task.cancel()
        other.cancel()
        push.close(0)
        pull.close(0)
        ctx.term()
    # Every step message was handled after the writer had another turn.
    assert all(b > a for a, b in zip(seen, seen[1:])), seen
