"""Property-based tests: random pool operations and random workloads keep every invariant.

The pool is driven by a state machine against a model of who holds which block. The scheduler is driven end to
end with a fake model that writes, into a simulated paged KV cache, what each slot's KV depends on (the token
prefix up to it) and checks that every chunk's context reads back its own request's prefix: prefix hits,
preemption, eviction and chunking all have to agree for that to hold.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pdserve.engine.core.block_pool import BlockPool
from pdserve.engine.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from pdserve.engine.core.scheduler import Scheduler
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams

BS = 2


def check_pool(pool: BlockPool, expected_refs: dict[int, int] | None = None) -> None:
    """The pool's own invariants, plus ref counts against a model when one is given."""
    free_ids = pool.free_block_ids()
    assert len(free_ids) == len(set(free_ids)) == pool.get_num_free_blocks()
    hashed = 0
    for block in pool.blocks:
        assert block.ref_cnt >= 0
        assert pool.is_free(block) == (block.ref_cnt == 0) == (block.block_id in free_ids)
        if expected_refs is not None:
            assert block.ref_cnt == expected_refs.get(block.block_id, 0)
        if block.block_hash is not None:
            hashed += 1
            assert pool.get_cached_block(block.block_hash) is block
    # Every block with a hash is the one its hash maps to, and the map holds nothing else.
    assert pool.num_cached_blocks == hashed
    used = sum(1 for b in pool.blocks if b.ref_cnt > 0)
    assert used + pool.get_num_free_blocks() == pool.num_blocks
    assert 0.0 <= pool.usage <= 1.0


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / cache / touch / free / reset against a list of 'owners' (tables of fake requests)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(6, BS, enable_caching=True, enable_kv_events=True)
        self.owners: list[list] = []
        self.stored: set[int] = set()  # the prefix cache as the event stream describes it

    @rule(n=st.integers(1, 4))
    def allocate(self, n):
        if n <= self.pool.get_num_free_blocks():
            self.owners.append(self.pool.get_new_blocks(n))

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def cache(self, data):
        table = data.draw(st.sampled_from(self.owners))
        # A small hash space makes duplicates (same content in two blocks) common.
        hashes = data.draw(st.lists(st.integers(0, 7), min_size=len(table), max_size=len(table)))
        start = data.draw(st.integers(0, len(table)))
        self.pool.cache_full_blocks(table, hashes, start, len(table), list(range(len(table) * BS)))

    @rule(block_hash=st.integers(0, 7))
    def touch(self, block_hash):
        block = self.pool.get_cached_block(block_hash)
        if block is not None:
            self.pool.touch([block])
            self.owners.append([block])

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data):
        table = self.owners.pop(data.draw(st.integers(0, len(self.owners) - 1)))
        self.pool.free_blocks(reversed(table))

    @rule()
    def reset(self):
        assert self.pool.reset_prefix_cache() == (not self.owners)

    @invariant()
    def consistent(self):
        refs: dict[int, int] = {}
        for table in self.owners:
            for block in table:
                refs[block.block_id] = refs.get(block.block_id, 0) + 1
        check_pool(self.pool, refs)
        for event in self.pool.take_events():
            if isinstance(event, BlockStored):
                assert not self.stored & set(event.block_hashes)
                assert len(event.token_ids) == len(event.block_hashes) * BS
                self.stored |= set(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                assert set(event.block_hashes) <= self.stored
                self.stored -= set(event.block_hashes)
            else:
                assert isinstance(event, AllBlocksCleared)
                self.stored.clear()
        assert self.stored == {b.block_hash for b in self.pool.blocks if b.block_hash is not None}


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------------------- scheduler end to end
EOS = 9


def fake_token(request: Request) -> int:
    """A deterministic 'model': the next token depends on the request's tokens so far."""
    return (sum(request.all_token_ids) * 31 + request.num_tokens) % 10


workloads = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4]),
    "pool_tokens": st.integers(8, 40),  # the pool's size in tokens: tight enough to preempt often
    "budget": st.integers(1, 16),
    "max_num_seqs": st.integers(1, 4),
    "chunked": st.booleans(),
    "caching": st.booleans(),
    # Prompts over a 2-token alphabet share prefixes often, so prefix hits are frequent.
    "requests": st.lists(st.tuples(st.lists(st.integers(0, 1), min_size=1, max_size=12), st.integers(1, 12),
                                   st.integers(0, 6)), min_size=1, max_size=8),
    "aborts": st.lists(st.tuples(st.integers(0, 30), st.integers(0, 5)), max_size=2),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads)
def test_random_workloads_finish_with_correct_kv_and_no_leaks(w):
    bs, max_model_len = w["block_size"], 24
    num_blocks = w["pool_tokens"] // bs
    s = Scheduler(block_size=bs, num_blocks=num_blocks, max_num_batched_tokens=w["budget"],
                  max_num_seqs=w["max_num_seqs"], max_model_len=max_model_len,
                  enable_prefix_caching=w["caching"], enable_chunked_prefill=w["chunked"], enable_kv_events=True)
    pending = [(arrive, Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), eos_token_id=EOS))
               for i, (prompt, max_tokens, arrive) in enumerate(w["requests"])]
    everyone = [r for _, r in pending]
    kv: dict[tuple[int, int], tuple[int, ...]] = {}  # (block id, offset) -> the token prefix its KV encodes
    progress: dict[str, int] = {}  # what a stateful runner knows: each live request's computed length
    for step in range(400):
        for _arrive, r in [p for p in pending if p[0] == step]:
            s.add_request(r)
        pending = [p for p in pending if p[0] > step]
        for at, idx in w["aborts"]:
            if at == step and idx < len(everyone):
                s.finish_requests(everyone[idx].request_id, RequestStatus.FINISHED_ABORTED)
        if not pending and not s.has_unfinished_requests():
            break
        out = s.schedule()
        assert out.total_num_tokens <= w["budget"] and len(out.chunks) <= w["max_num_seqs"]
        assert len({c.request_id for c in out.chunks}) == len(out.chunks)
        sizes = [c.num_tokens == 1 for c in out.chunks]
        assert sizes == sorted(sizes, reverse=True)  # one-token chunks lead the batch
        requests = {c.request_id: s.get_request(c.request_id) for c in out.chunks}
        for rid in out.finished_request_ids | out.preempted_request_ids:
            del progress[rid]  # the runner drops its state; each id is reported exactly once
        for c in out.chunks:
            r = requests[c.request_id]
            assert c.num_tokens >= 1
            # A request the runner knows continues where it stopped; a new one starts after its cache hits.
            assert c.start_pos == progress.get(c.request_id, r.num_cached_tokens)
            progress[c.request_id] = c.context_len
        # Phase 1: write this step's KV (the runner writes a layer's KV for the whole batch before attention).
        for c in out.chunks:
            tokens = requests[c.request_id].all_token_ids
            assert c.token_ids == tokens[c.start_pos:c.context_len]
            assert c.sample == (c.context_len == len(tokens))
            assert len(c.block_ids) >= -(-c.context_len // bs)
            for p in range(c.start_pos, c.context_len):
                kv[(c.block_ids[p // bs], p % bs)] = tuple(tokens[:p + 1])
        # Phase 2: every position a chunk attends to holds its own request's prefix.
        for c in out.chunks:
            tokens = requests[c.request_id].all_token_ids
            for p in range(c.context_len):
                assert kv.get((c.block_ids[p // bs], p % bs)) == tuple(tokens[:p + 1])
        sampled = {c.request_id: fake_token(requests[c.request_id]) for c in out.chunks if c.sample}
        s.update_from_output(out, sampled)
        s.take_finished_without_output()
        s.take_kv_events()
        pool = s.kv_cache_manager.pool
        check_pool(pool)
        assert all(b.block_hash is not None for b in pool.blocks if b.ref_cnt > 1)  # sharing only via cache
    else:
        raise AssertionError("the scheduler did not drain its queue in 400 steps")

    assert s.get_stats().num_free_blocks == num_blocks
    for r in everyone:
        assert r.is_finished
        if r.status != RequestStatus.FINISHED_ABORTED:
            assert 1 <= r.num_output_tokens <= r.sampling_params.max_tokens
        elif r.abort_reason is not None:  # aborted by the scheduler itself: only if it could never run
            too_big = -(-r.num_tokens // bs) > num_blocks
            assert too_big or (not w["chunked"] and r.num_tokens > w["budget"])
