"""The scheduler's side of speculative decoding, exactly: lookahead slots, the chunk it builds, the rollback of
rejected drafts (computed tokens and blocks), caps by budget, context and max_tokens, and that no block holding
an unverified token ever enters the prefix cache."""

from __future__ import annotations

from pdserve.engine.core.scheduler import Scheduler
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams

EOS = 2


def make(**kw) -> Scheduler:
    args = dict(block_size=4, num_blocks=16, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=64)
    args.update(kw)
    return Scheduler(**args)


def decoding(s: Scheduler, rid: str = "a", prompt: list[int] | None = None, **params) -> Request:
    """A request past its prefill, with one output token (7); other running requests get a 7 too."""
    params.setdefault("max_tokens", 100)
    r = Request(rid, prompt or [10, 11, 12, 13, 14, 15], SamplingParams(**params), eos_token_id=EOS)
    s.add_request(r)
    out = s.schedule()
    s.update_from_output(out, {c.request_id: 7 for c in out.chunks if c.sample})
    return r


def test_drafts_ride_on_the_decode_chunk_and_rejected_slots_roll_back() -> None:
    s = make()
    r = decoding(s)  # 7 tokens known, 6 computed, 2 blocks
    r.spec_token_ids = [20, 21, 22]
    out = s.schedule()
    (c,) = out.chunks
    assert (c.token_ids, c.start_pos, c.num_draft_tokens, c.sample, c.num_logits_rows) == (
        [7, 20, 21, 22], 6, 3, True, 4)
    assert r.num_computed_tokens == 10 and len(c.block_ids) == 3  # slots up to position 9
    # Verification accepted 20 and emitted 30 instead of 21: 22's slot and 21's are rolled back.
    assert s.update_from_output(out, {"a": [20, 30]}) == [r]
    assert r.output_token_ids == [7, 20, 30] and r.num_computed_tokens == 8
    assert len(s.kv_cache_manager.get_block_ids(r)) == 3  # 9 tokens still need the third block
    r.spec_token_ids = [40, 41, 42, 43]
    out = s.schedule()
    assert out.chunks[0].token_ids == [30, 40, 41, 42, 43] and r.num_computed_tokens == 13
    assert len(out.chunks[0].block_ids) == 4
    s.update_from_output(out, {"a": [50]})  # nothing accepted: the fourth block held only drafts
    assert r.num_computed_tokens == 9 and len(s.kv_cache_manager.get_block_ids(r)) == 3
    assert s.kv_cache_manager.get_num_free_blocks() == 13


def test_all_accepted_emits_the_bonus_token_too() -> None:
    s = make()
    r = decoding(s)
    r.spec_token_ids = [20, 21]
    out = s.schedule()
    s.update_from_output(out, {"a": [20, 21, 22]})
    assert r.output_token_ids == [7, 20, 21, 22] and r.num_computed_tokens == 9  # 22's KV comes next step
    out = s.schedule()
    assert [(c.token_ids, c.start_pos) for c in out.chunks] == [([22], 9)]  # drafts are used once


def test_a_stop_among_the_emitted_tokens_ends_the_request_there() -> None:
    s = make()
    r = decoding(s)
    r.spec_token_ids = [20, EOS, 21]
    out = s.schedule()
    s.update_from_output(out, {"a": [20, EOS, 21, 22]})
    assert r.output_token_ids == [7, 20, EOS] and r.status == RequestStatus.FINISHED_STOPPED
    assert s.kv_cache_manager.get_num_free_blocks() == 16


def test_drafts_are_cut_to_max_tokens_context_and_budget() -> None:
    s = make()
    r = decoding(s, max_tokens=3)  # one output so far: at most 2 more, so one draft
    r.spec_token_ids = [20, 21, 22]
    assert s.schedule().chunks[0].num_draft_tokens == 1
    s = make(max_model_len=9)
    r = decoding(s)  # 7 tokens: slots up to 9 allow 2 drafts
    r.spec_token_ids = [20, 21, 22]
    assert s.schedule().chunks[0].num_draft_tokens == 2
    s = make(max_num_batched_tokens=3)
    r = decoding(s, prompt=[10, 11])
    r.spec_token_ids = [20, 21, 22]
    assert s.schedule().chunks[0].num_draft_tokens == 2


def test_no_room_for_lookahead_decodes_plainly_without_preempting() -> None:
    s = make(num_blocks=4)
    a = decoding(s, "a")  # 2 blocks
    b = decoding(s, "b", prompt=[30, 31, 32, 33, 34, 35])  # 2 blocks: the pool is full
    a.spec_token_ids = [20, 21, 22]  # would need a third block
    out = s.schedule()
    assert [(c.request_id, c.num_draft_tokens) for c in out.chunks] == [("a", 0), ("b", 0)]
    assert not out.preempted_request_ids and b.status == RequestStatus.RUNNING


def test_unverified_tokens_never_enter_the_prefix_cache() -> None:
    s = make()
    r = decoding(s, prompt=[10, 11, 12, 13, 14, 15])  # 7 known tokens: block 0 cached, block 1 not full
    r.spec_token_ids = [20, 21, 22, 23, 24]  # fills blocks 1 and 2 with drafts
    out = s.schedule()
    assert s.kv_cache_manager._num_cached["a"] == 1  # only the block of known tokens
    s.update_from_output(out, {"a": [20, 99]})
    # Known now: 10..15, 7, 20 (verified: their KV was computed by the verify step), 99. Block 1 (14, 15, 7, 20)
    # is full of verified tokens; block 2 held drafts 21..24 and holds 99 now.
    # A new request whose prompt is the verified tokens plus the rejected drafts finds only the verified prefix.
    other = Request("b", [10, 11, 12, 13, 14, 15, 7, 20, 21, 22, 23, 24, 5], SamplingParams(max_tokens=1))
    s.add_request(other)
    s.schedule()
    assert other.num_cached_tokens == 8


def test_no_drafts_while_a_step_is_in_flight_or_for_asynchronous_launches() -> None:
    s = make(async_scheduling=True)
    r = decoding(s)
    r.spec_token_ids = [20, 21]
    s.allow_drafts = False  # the engine core launches this step without waiting
    assert s.schedule().chunks[0].num_draft_tokens == 0
    s = make(async_scheduling=True)
    r = decoding(s)
    s.schedule()  # in flight: its token is pending
    r.spec_token_ids = [20, 21]
    (c,) = s.schedule().chunks
    assert c.request_id == "a" and c.num_draft_tokens == 0 and c.token_ids == [-1]  # a placeholder, no drafts
