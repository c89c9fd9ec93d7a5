"""Scheduler: exact chunks per step for given budgets, preemption, prefix hits, aborts and stop conditions.

Each step is written as a table of ``(request_id, start_pos, num_tokens, sample)`` rows.
"""

from __future__ import annotations

import pytest

from pdserve.engine.core.kv_events import BlockStored
from pdserve.engine.core.scheduler import Scheduler
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams

EOS = 2
TOKEN = 7  # what the fake model samples unless a test says otherwise


def make(**kw) -> Scheduler:
    args = dict(block_size=4, num_blocks=16, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=64)
    args.update(kw)
    return Scheduler(**args)


def req(rid: str, prompt_len: int, prompt: list[int] | None = None, **params) -> Request:
    """A request whose prompt tokens are unique to its id (no accidental prefix hits) unless given."""
    params.setdefault("max_tokens", 100)
    tokens = prompt if prompt is not None else [1000 * (ord(rid[0]) - 96) + i for i in range(prompt_len)]
    return Request(rid, tokens, SamplingParams(**params), eos_token_id=EOS)


def add(s: Scheduler, *requests: Request) -> Scheduler:
    for r in requests:
        s.add_request(r)
    return s


def step(s: Scheduler, tokens: dict[str, int] | None = None):
    """Schedule, 'run the model' (sample TOKEN or the given token), update. Returns (rows, output, updated)."""
    out = s.schedule()
    sampled = {c.request_id: (tokens or {}).get(c.request_id, TOKEN) for c in out.chunks if c.sample}
    updated = s.update_from_output(out, sampled)
    return rows(out), out, updated


def rows(out) -> list[tuple[str, int, int, bool]]:
    return [(c.request_id, c.start_pos, c.num_tokens, c.sample) for c in out.chunks]


def run(s: Scheduler, num_steps: int) -> list[list[tuple[str, int, int, bool]]]:
    return [step(s)[0] for _ in range(num_steps)]


# ---------------------------------------------------------------------------- budgets and chunks
def test_long_prompt_is_chunked_to_the_budget_then_decodes():
    s = add(make(max_num_batched_tokens=8), req("a", 20))
    assert run(s, 4) == [
        [("a", 0, 8, False)],
        [("a", 8, 8, False)],
        [("a", 16, 4, True)],
        [("a", 20, 1, True)],
    ]


def test_decodes_and_prefill_chunks_share_a_step():
    s = add(make(max_num_batched_tokens=16), req("a", 4), req("b", 30), req("c", 3))
    assert run(s, 4) == [
        [("a", 0, 4, True), ("b", 0, 12, False)],
        [("a", 4, 1, True), ("b", 12, 15, False)],
        [("a", 5, 1, True), ("b", 27, 3, True), ("c", 0, 3, True)],
        [("a", 6, 1, True), ("b", 30, 1, True), ("c", 3, 1, True)],
    ]


def test_chunk_carries_the_tokens_positions_and_whole_block_table():
    s = add(make(max_num_batched_tokens=6), req("a", 9))
    _, out, _ = step(s)
    (chunk,) = out.chunks
    assert chunk.token_ids == [1000, 1001, 1002, 1003, 1004, 1005]
    assert chunk.block_ids == [0, 1]
    _, out, _ = step(s)
    assert out.chunks[0].token_ids == [1006, 1007, 1008] and out.chunks[0].block_ids == [0, 1, 2]
    _, out, _ = step(s)
    assert out.chunks[0].token_ids == [TOKEN] and out.chunks[0].start_pos == 9


def test_max_num_seqs_caps_the_running_set():
    s = add(make(max_num_seqs=2, max_num_batched_tokens=32), req("a", 2, max_tokens=1), req("b", 2),
            req("c", 2))
    assert run(s, 2) == [
        [("a", 0, 2, True), ("b", 0, 2, True)],  # a finishes here (max_tokens=1)
        [("b", 2, 1, True), ("c", 0, 2, True)],
    ]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_it_fits_in_whole():
    s = add(make(max_num_batched_tokens=10, enable_chunked_prefill=False), req("a", 6), req("b", 6),
            req("c", 2))
    assert run(s, 2) == [
        [("a", 0, 6, True)],  # b does not fit the 4 left; c may not overtake it
        [("a", 6, 1, True), ("b", 0, 6, True), ("c", 0, 2, True)],
    ]


def test_without_chunked_prefill_a_prompt_larger_than_the_budget_is_aborted():
    s = add(make(max_num_batched_tokens=8, enable_chunked_prefill=False), req("a", 9), req("b", 3))
    assert step(s)[0] == [("b", 0, 3, True)]
    (aborted,) = s.take_finished_without_output()
    assert aborted.request_id == "a" and aborted.status == RequestStatus.FINISHED_ABORTED
    assert "max_num_batched_tokens" in aborted.abort_reason


# ---------------------------------------------------------------------------- prefix cache
def test_prefix_hit_starts_the_request_after_the_cached_blocks():
    s = make()
    shared = list(range(100, 110))  # 10 tokens: two full blocks and a partial one
    add(s, req("a", 0, prompt=shared, max_tokens=1))
    assert step(s)[0] == [("a", 0, 10, True)]
    b = req("b", 0, prompt=shared + [5, 6])
    add(s, b)
    _, out, _ = step(s)
    assert rows(out) == [("b", 8, 4, True)]
    assert out.chunks[0].block_ids == [0, 1, 3]  # a's blocks 0 and 1 reused; block 2 (a's tail) was freed
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 12
    stats = s.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (10 + 12, 8)


def test_identical_prompts_in_one_step_share_blocks_cached_at_allocation():
    s = add(make(), req("a", 0, prompt=list(range(9))), req("b", 0, prompt=list(range(9))))
    _, out, _ = step(s)
    # b's single remaining token makes it a one-token chunk, and those lead the batch (the runner's contract).
    assert rows(out) == [("b", 8, 1, True), ("a", 0, 9, True)]
    assert [c.block_ids for c in out.chunks] == [[0, 1, 3], [0, 1, 2]]


def test_prefix_caching_disabled_recomputes_everything():
    s = add(make(enable_prefix_caching=False), req("a", 0, prompt=list(range(9))),
            req("b", 0, prompt=list(range(9))))
    assert step(s)[0] == [("a", 0, 9, True), ("b", 0, 7, False)]


# ---------------------------------------------------------------------------- preemption
def test_block_shortage_preempts_the_newest_running_request():
    s = add(make(num_blocks=4), req("a", 7), req("b", 7))
    b = s.get_request("b")
    assert run(s, 2) == [
        [("a", 0, 7, True), ("b", 0, 7, True)],  # a: blocks 0 1, b: blocks 2 3
        [("a", 7, 1, True), ("b", 7, 1, True)],  # the 8th slot still fits each second block
    ]
    _, out, _ = step(s)
    assert rows(out) == [("a", 8, 1, True)]
    assert out.preempted_request_ids == {"b"}
    assert out.chunks[0].block_ids == [0, 1, 3]  # b freed its table tail first: 3 is at the head
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert s.num_waiting == 1 and s.get_stats().num_preemptions == 1
    # b's first block (2) is still cached, its second was evicted; with a holding 3 blocks, b needs 3 and
    # only its own cached block is free, so b waits.
    assert step(s)[0] == [("a", 9, 1, True)]


def test_the_newest_request_preempts_itself_when_it_is_the_one_short_of_blocks():
    s = add(make(num_blocks=4), req("a", 5), req("b", 8))
    assert step(s)[0] == [("a", 0, 5, True), ("b", 0, 8, True)]
    rws, out, _ = step(s)
    assert rws == [("a", 5, 1, True)]  # a's slot 6 fits its block 1; b's slot 9 needs a fifth block
    assert out.preempted_request_ids == {"b"}
    assert s.get_request("b").status == RequestStatus.PREEMPTED


def test_preempted_request_recomputes_prompt_and_outputs_with_prefix_help():
    s = add(make(num_blocks=5), req("a", 8, max_tokens=3), req("b", 8, max_tokens=3))
    b = s.get_request("b")
    assert run(s, 3) == [
        [("a", 0, 8, True), ("b", 0, 8, True)],  # a: blocks 0 1, b: blocks 2 3
        [("a", 8, 1, True)],  # a takes block 4; b, the newest, is short of a block and preempts itself
        [("a", 9, 1, True)],  # a finishes; b's 2 cached blocks are all that is free, b needs a third
    ]
    assert b.output_token_ids == [TOKEN] and b.status == RequestStatus.PREEMPTED
    _, out, _ = step(s)
    # The whole prompt is a prefix hit; only b's first output token is recomputed (and samples the next).
    assert rows(out) == [("b", 8, 1, True)] and out.chunks[0].token_ids == [TOKEN]
    assert out.chunks[0].block_ids == [2, 3, 4]
    assert b.num_cached_tokens == 8 and b.output_token_ids == [TOKEN] * 2
    assert step(s)[0] == [("b", 9, 1, True)] and b.status == RequestStatus.FINISHED_LENGTH


# ---------------------------------------------------------------------------- finishing
@pytest.mark.parametrize("params, sampled, max_model_len, finished_after, status, stop_reason", [
    ({"max_tokens": 3}, [5, 5, 5], 64, 3, RequestStatus.FINISHED_LENGTH, None),
    ({}, [5, EOS], 64, 2, RequestStatus.FINISHED_STOPPED, None),
    ({"ignore_eos": True, "max_tokens": 3}, [EOS, EOS, EOS], 64, 3, RequestStatus.FINISHED_LENGTH, None),
    ({"stop_token_ids": [9]}, [5, 9], 64, 2, RequestStatus.FINISHED_STOPPED, 9),
    ({"min_tokens": 3, "max_tokens": 9}, [EOS, EOS, EOS], 64, 3, RequestStatus.FINISHED_STOPPED, None),
    ({"max_tokens": None}, [5, 5, 5, 5], 6, 2, RequestStatus.FINISHED_LENGTH, None),  # 4 prompt + 2
])
def test_requests_finish_by_their_stop_conditions(params, sampled, max_model_len, finished_after, status,
                                                  stop_reason):
    s = add(make(max_model_len=max_model_len), req("a", 4, **params))
    a = s.get_request("a")
    for i, token in enumerate(sampled[:finished_after]):
        _, _, updated = step(s, {"a": token})
        assert updated == [a]
        assert a.is_finished == (i + 1 == finished_after)
    assert (a.status, a.stop_reason, a.num_output_tokens) == (status, stop_reason, finished_after)
    assert not s.has_unfinished_requests() and s.get_request("a") is None
    assert s.get_stats().num_free_blocks == 16
    assert s.schedule().finished_request_ids == {"a"}


def test_abort_frees_blocks_and_leaves_the_queues():
    s = add(make(max_num_batched_tokens=8), req("a", 8), req("b", 8), req("c", 4))
    step(s)
    assert s.get_stats().num_free_blocks == 14
    s.finish_requests(["a", "c", "nope"], RequestStatus.FINISHED_ABORTED)
    assert s.get_stats().num_free_blocks == 16
    assert (s.num_running, s.num_waiting) == (0, 1)
    rws, out, _ = step(s)
    assert rws == [("b", 0, 8, True)] and out.finished_request_ids == {"a"}  # c never ran
    s.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished_requests()
    with pytest.raises(ValueError, match="finished status"):
        s.finish_requests(["b"], RequestStatus.RUNNING)


def test_request_aborted_between_schedule_and_update_gets_no_token():
    s = add(make(), req("a", 4), req("b", 4))
    out = s.schedule()
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    updated = s.update_from_output(out, {"a": 5, "b": 5})
    assert [r.request_id for r in updated] == ["b"]
    assert s.schedule().finished_request_ids == {"a"}


def test_missing_sampled_token_is_an_error():
    s = add(make(), req("a", 4))
    out = s.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        s.update_from_output(out, {})


# ---------------------------------------------------------------------------- hopeless requests
def test_prompt_larger_than_the_pool_is_aborted_not_waited_on():
    s = add(make(num_blocks=4), req("a", 17), req("b", 3))
    assert step(s)[0] == [("b", 0, 3, True)]
    (a,) = s.take_finished_without_output()
    assert a.status == RequestStatus.FINISHED_ABORTED and "need 5 KV cache blocks" in a.abort_reason
    assert s.take_finished_without_output() == []


def test_request_outgrowing_the_pool_while_decoding_is_aborted():
    s = add(make(num_blocks=4), req("a", 16))
    assert step(s)[0] == [("a", 0, 16, True)]
    rws, out, _ = step(s)
    assert rws == [] and out.finished_request_ids == {"a"}
    (a,) = s.take_finished_without_output()
    assert "17 tokens need 5" in a.abort_reason
    assert s.get_stats().num_free_blocks == 4 and not s.has_unfinished_requests()


@pytest.mark.parametrize("request_, message", [
    (Request("e", [], SamplingParams()), "empty prompt"),
    (Request("l", [1] * 65, SamplingParams()), "more than max_model_len"),
])
def test_add_request_rejects_bad_requests(request_, message):
    with pytest.raises(ValueError, match=message):
        make().add_request(request_)


def test_add_request_rejects_a_duplicate_id():
    s = add(make(), req("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("a", 3))


# ---------------------------------------------------------------------------- stats and events
def test_stats_snapshot():
    s = add(make(max_num_batched_tokens=8), req("a", 8), req("b", 8))
    step(s)
    stats = s.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks, stats.num_total_blocks) == (1, 1, 14, 16)
    assert stats.kv_cache_usage == pytest.approx(2 / 16)


def test_kv_events_flow_out_of_the_scheduler():
    s = add(make(enable_kv_events=True), req("a", 0, prompt=list(range(6))))
    step(s)
    a = s.get_request("a")
    assert s.take_kv_events() == [BlockStored((a.block_hashes[0],), None, (0, 1, 2, 3), 4)]
    assert s.take_kv_events() == []
