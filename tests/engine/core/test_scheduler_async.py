"""Scheduler with asynchronous scheduling: exact chunks, block ids and hashes while one step is in flight.

The engine's order is ``schedule N+1, update N``: each test spells it out. ``P`` is the placeholder input of a
decode whose token the step in flight is still sampling.
"""

from __future__ import annotations

from pdserve.engine.core.block_hash import BlockHasher
from pdserve.engine.core.sched_output import PLACEHOLDER_TOKEN_ID as P
from pdserve.engine.core.scheduler import Scheduler
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams

EOS = 2


def make(**kw) -> Scheduler:
    args = dict(block_size=4, num_blocks=16, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=64,
                async_scheduling=True)
    args.update(kw)
    return Scheduler(**args)


def req(rid: str, prompt_len: int, **params) -> Request:
    params.setdefault("max_tokens", 100)
    tokens = [1000 * (ord(rid[0]) - 96) + i for i in range(prompt_len)]
    return Request(rid, tokens, SamplingParams(**params), eos_token_id=EOS)


def add(s: Scheduler, *requests: Request) -> Scheduler:
    for r in requests:
        s.add_request(r)
    return s


def rows(out) -> list[tuple[str, int, list[int], list[int], bool]]:
    return [(c.request_id, c.start_pos, c.token_ids, c.block_ids, c.sample) for c in out.chunks]


def update(s: Scheduler, out, tokens: dict[str, int]) -> list[str]:
    """Apply a step's samples (``tokens`` for every sampled chunk); returns the ids that got a token."""
    sampled = {c.request_id: tokens[c.request_id] for c in out.chunks if c.sample}
    return [r.request_id for r in s.update_from_output(out, sampled)]


def test_next_decode_is_scheduled_on_the_pending_token():
    a = req("a", 6)
    s = add(make(), a)
    s1 = s.schedule()
    assert rows(s1) == [("a", 0, a.prompt_token_ids, [0, 1], True)]
    s2 = s.schedule()  # step 1 still in flight
    assert rows(s2) == [("a", 6, [P], [0, 1], True)]
    assert (a.num_pending_tokens, a.num_computed_tokens, a.output_token_ids) == (2, 7, [])
    assert update(s, s1, {"a": 50}) == ["a"]
    assert (a.num_pending_tokens, a.output_token_ids) == (1, [50])
    s3 = s.schedule()
    assert rows(s3) == [("a", 7, [P], [0, 1], True)]
    assert update(s, s2, {"a": 51}) == ["a"]
    s4 = s.schedule()
    assert rows(s4) == [("a", 8, [P], [0, 1, 2], True)]
    assert update(s, s3, {"a": 52}) == ["a"] and a.output_token_ids == [50, 51, 52]


def test_a_block_completed_by_a_pending_token_is_hashed_once_the_token_is_known():
    a = req("a", 6)
    s = add(make(), a)
    pool = s.kv_cache_manager.pool
    s1 = s.schedule()
    s2 = s.schedule()
    update(s, s1, {"a": 50})
    s3 = s.schedule()  # fills slot 7, the last of block 1, with a token not known yet
    assert s3.chunks[0].start_pos == 7
    assert pool.num_cached_blocks == 1 and len(a.block_hashes) == 1
    update(s, s2, {"a": 51})  # slot 7's token is now known
    s.schedule()
    hasher = BlockHasher(4)
    assert pool.num_cached_blocks == 2
    assert a.block_hashes == hasher.hash_prefix(a.prompt_token_ids + [50, 51])
    assert pool.get_cached_block(a.block_hashes[1]).block_id == 1


def test_max_tokens_reached_by_the_pending_token_is_not_scheduled_again():
    a = req("a", 4, max_tokens=2)
    s = add(make(), a)
    s1 = s.schedule()
    s2 = s.schedule()
    assert rows(s2) == [("a", 4, [P], [0, 1], True)]
    update(s, s1, {"a": 50})
    assert s.schedule().is_empty  # its pending token is its last: nothing to compute for it
    assert update(s, s2, {"a": 51}) == ["a"]
    assert a.status == RequestStatus.FINISHED_LENGTH and a.output_token_ids == [50, 51]
    assert s.schedule().finished_request_ids == {"a"}
    assert s.get_stats().num_free_blocks == 16 and not s.has_unfinished_requests()


def test_max_model_len_reached_by_the_pending_token_is_not_scheduled_again():
    a = req("a", 4)
    s = add(make(max_model_len=6), a)
    s1 = s.schedule()
    s2 = s.schedule()
    update(s, s1, {"a": 50})
    assert s.schedule().is_empty
    update(s, s2, {"a": 51})
    assert a.status == RequestStatus.FINISHED_LENGTH and a.num_tokens == 6


def test_eos_is_seen_one_step_late_and_the_extra_row_is_dropped():
    a, b = req("a", 4), req("b", 4)
    s = add(make(), a, b)
    s1 = s.schedule()
    s2 = s.schedule()
    assert [c.token_ids for c in s2.chunks] == [[P], [P]]
    assert update(s, s1, {"a": EOS, "b": 7}) == ["a", "b"]
    assert a.status == RequestStatus.FINISHED_STOPPED
    assert s.get_stats().num_free_blocks == 16 - 2  # a's blocks are free while step 2 still writes slot 4
    s3 = s.schedule()
    assert [c.request_id for c in s3.chunks] == ["b"] and s3.finished_request_ids == {"a"}
    assert update(s, s2, {"a": 99, "b": 8}) == ["b"]  # a's row of step 2 is ignored
    assert a.output_token_ids == [EOS] and a.num_pending_tokens == 0
    assert b.output_token_ids == [7, 8]
    # a's block 1 (slot 4 was pending when step 2 was scheduled) never entered the prefix cache.
    assert s.kv_cache_manager.pool.num_cached_blocks == 2  # the two prompts' full first blocks


def test_abort_while_its_rows_are_in_flight():
    a, b = req("a", 4), req("b", 4)
    s = add(make(), a, b)
    s1 = s.schedule()
    s2 = s.schedule()
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert update(s, s1, {"a": 5, "b": 7}) == ["b"]
    assert update(s, s2, {"a": 6, "b": 8}) == ["b"]
    assert a.output_token_ids == [] and b.output_token_ids == [7, 8]
    assert s.schedule().finished_request_ids == {"a"}


def test_a_reused_id_never_gets_the_old_requests_late_token():
    old = req("a", 4)
    s = add(make(), old)
    s1 = s.schedule()
    s2 = s.schedule()
    update(s, s1, {"a": EOS})
    new = req("a", 5)
    s.add_request(new)
    s3 = s.schedule()
    # The same first four tokens: the old request's cached block 0 serves the new one.
    assert rows(s3) == [("a", 4, [1004], [0, 2], True)]
    assert update(s, s2, {"a": 99}) == []  # the old request's dropped row
    assert new.output_token_ids == [] and new.num_pending_tokens == 1
    assert update(s, s3, {"a": 40}) == ["a"] and new.output_token_ids == [40]


def test_preempted_request_gets_its_pending_token_then_recomputes_real_tokens():
    a, b = req("a", 7, max_tokens=3), req("b", 7)
    s = add(make(num_blocks=4), a, b)
    s1 = s.schedule()  # a: blocks 0 1, b: blocks 2 3
    s2 = s.schedule()  # the 8th slot still fits each second block
    assert rows(s2) == [("a", 7, [P], [0, 1], True), ("b", 7, [P], [2, 3], True)]
    update(s, s1, {"a": 11, "b": 21})
    s3 = s.schedule()  # a needs a third block: b, the newest, is preempted with its step-2 token in flight
    assert rows(s3) == [("a", 8, [P], [0, 1, 3], True)]
    assert s3.preempted_request_ids == {"b"}
    assert (b.status, b.num_computed_tokens, b.num_pending_tokens) == (RequestStatus.PREEMPTED, 0, 1)
    assert update(s, s2, {"a": 12, "b": 22}) == ["a", "b"]  # b still gets the token step 2 sampled
    assert b.output_token_ids == [21, 22] and b.num_pending_tokens == 0
    assert s.schedule().is_empty  # a's pending token is its third and last; b waits for blocks
    update(s, s3, {"a": 13})
    assert a.status == RequestStatus.FINISHED_LENGTH
    s5 = s.schedule()
    (chunk,) = s5.chunks
    assert chunk.request_id == "b" and chunk.sample
    assert chunk.token_ids == b.all_token_ids[chunk.start_pos:] and P not in chunk.token_ids
    assert chunk.start_pos == 4  # b's first block was still cached


def test_preempted_request_that_finishes_by_its_pending_token_leaves_the_queue():
    a, b = req("a", 7), req("b", 7, max_tokens=2)
    s = add(make(num_blocks=4), a, b)
    s1 = s.schedule()
    s2 = s.schedule()
    update(s, s1, {"a": 11, "b": 21})
    s3 = s.schedule()
    assert s3.preempted_request_ids == {"b"}
    assert update(s, s2, {"a": 12, "b": 22}) == ["a", "b"]
    assert b.status == RequestStatus.FINISHED_LENGTH and s.num_waiting == 0


def test_without_async_scheduling_a_pending_token_is_never_scheduled():
    a = req("a", 4)
    s = add(make(async_scheduling=False), a)
    s1 = s.schedule()
    assert s.schedule().is_empty
    update(s, s1, {"a": 7})
    assert rows(s.schedule()) == [("a", 4, [7], [0, 1], True)]
