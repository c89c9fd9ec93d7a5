"""KV events from an engine's block pool to the router's prefix index, over a real ZeroMQ PUB/SUB socket."""

from __future__ import annotations

import asyncio

from router_builders import hasher

from pdserve.engine.core.kv_cache_manager import KVCacheManager
from pdserve.engine.core.kv_events import BlockStored
from pdserve.engine.core.sched_output import SchedulerStats
from pdserve.engine.kv_event_publisher import WIRE_VERSION, EventBatch, KVEventPublisher, LoadMsg, to_wire
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.services.router.kv_events import KVEventSubscriber
from pdserve.services.router.prefix_index import PrefixTracker
from pdserve.services.router.state import PodTable
from pdserve.services.router.types import Endpoint, Role


def free_port() -> int:
    from pdserve.cli.local_servers import free_port

    return free_port()


def stats(waiting=0, running=0, usage=0.0):
    return SchedulerStats(num_running=running, num_waiting=waiting, kv_cache_usage=usage, num_free_blocks=0,
                          num_total_blocks=0, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0)


async def until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_engine_events_reach_the_router_index_over_zmq():
    address = f"tcp://127.0.0.1:{free_port()}"
    publisher = KVEventPublisher(address, report_interval_s=0.05)
    pods, tracker = PodTable(), PrefixTracker()
    subscriber = KVEventSubscriber(pods, tracker, live_for_s=2.0)
    pods.upsert(Endpoint("d0", Role.DECODE, "", "127.0.0.1:1", kv_events=address))
    try:
        # The engine side: a real KV cache manager caching a 12-token prompt (3 blocks of 4).
        mgr = KVCacheManager(block_size=4, num_blocks=8, enable_kv_events=True)
        prompt = list(range(7, 19))
        mgr.allocate_slots(Request("r", prompt, SamplingParams(max_tokens=1)), len(prompt))
        events = mgr.take_events()
        # PUB/SUB drops what is sent before the subscription lands: publish until the router has it.
        hashes = hasher().hash_prefix(prompt)
        for _ in range(100):
            publisher.publish(events, stats(waiting=3, running=1, usage=0.25), force=True)
            await asyncio.sleep(0.02)
            if tracker.exact.num_blocks("d0") == 3:
                break
        assert tracker.exact.match(hashes, ["d0"]) == {"d0": 3}
        state = pods.get("d0")
        assert state.events_live() and (state.load.num_waiting, state.load.num_running) == (3, 1)
        # Eviction on the engine reaches the router too.
        mgr.free(Request("r", prompt, SamplingParams(max_tokens=1)))
        mgr.pool.get_new_blocks(8)  # reuses (evicts) every cached block
        publisher.publish(mgr.take_events(), force=True)
        await until(lambda: tracker.exact.num_blocks("d0") == 0)
    finally:
        await subscriber.close()
        publisher.close()


def batch(engine_id, seq, events=(), load=None):
    return EventBatch(WIRE_VERSION, engine_id, seq, 0.0, list(events), load)


def stored_msg(tokens):
    hs = hasher().hash_prefix(tokens)
    return to_wire(BlockStored(tuple(hs), None, tuple(tokens[:len(hs) * 4]), 4))  # hashes travel as bytes


async def test_gap_is_counted_and_a_restarted_engine_starts_over():
    from pdserve.services.router.metrics import RouterMetrics

    pods, tracker, metrics = PodTable(), PrefixTracker(), RouterMetrics()
    sub = KVEventSubscriber(pods, tracker, metrics)
    pods.upsert(Endpoint("d0", Role.DECODE, "", "x:1"))
    sub.apply("d0", batch("e1", 0, [stored_msg(list(range(8)))]))
    sub.apply("d0", batch("e1", 3, [], LoadMsg(0, 0, 0.0)))  # batches 1 and 2 lost
    assert metrics.kv_event_gaps.labels("d0")._value.get() == 1
    assert tracker.exact.num_blocks("d0") == 2
    sub.apply("d0", batch("e2", 0, [stored_msg(list(range(100, 104)))]))  # the engine restarted
    assert tracker.exact.num_blocks("d0") == 1
    sub.apply("d0", EventBatch(WIRE_VERSION + 1, "e2", 1, 0.0, [stored_msg(list(range(8)))]))  # unknown version
    assert tracker.exact.num_blocks("d0") == 1
    await sub.close()


def test_publisher_sends_nothing_when_idle_between_reports():
    address = f"tcp://127.0.0.1:{free_port()}"
    publisher = KVEventPublisher(address, report_interval_s=60)
    try:
        assert publisher.publish([], stats(), force=True)
        assert not publisher.publish([], stats())  # nothing new and no report due
        assert publisher.publish([BlockStored((1,), None, (1, 2, 3, 4), 4)], stats())
    finally:
        publisher.close()
