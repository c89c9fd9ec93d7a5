"""One pure-decode step of a simulated engine core, without the general step loop.

Most steps of a decode pod decode one token for each running request and do nothing else. The general path
(:meth:`EngineCore.step`: ``schedule()`` building chunks, the runner, the sampler, ``update_from_output`` building
outputs, the cluster reading them) costs tens of microseconds a token in Python, which caps ``pdserve sim`` at a
few 10^4 simulated tokens per second of wall time. :func:`fast_decode_step` makes exactly the state changes that
path makes for such a step, in one loop over the batch:

- the same block allocations, in the same order, through the real :class:`KVCacheManager` (so the prefix cache,
  evictions and the free pool evolve as they would), skipped where ``allocate_slots`` would change nothing;
- the cost model's time for the same batched tokens and total context, spent on the core's clock;
- the same tokens (:func:`sim_next_token`), the real stop check, finished requests retired through the scheduler.

It declines (returns None, and the caller runs the general step) whenever the step could be anything else: a
request waiting, loading or held, a prompt chunk, drafts, a KV load in flight, or a pool that might run short
(a preemption). ``tests/sim/test_sim_fast_forward.py`` checks a cluster run with it against one without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.core.stop import check_stop
from pdserve.sim.core import SimEngineCore, sim_next_token


@dataclass(frozen=True)
class FastStep:
    """What one fast-forwarded step did: each request's new token, in batch order, and which ones finished."""

    batch_size: int
    request_ids: list[str]
    token_ids: list[int]
    finished: frozenset[str]


def fast_decode_step(core: SimEngineCore) -> FastStep | None:
    """Run the next step of ``core`` if it is pure decode (see the module docstring); None otherwise."""
    sched = core.scheduler
    batch = sched.pure_decode_batch()
    if batch is None or core.step_stats is not None or core.spec is not None or core.structured is not None:
        return None
    if sched.max_model_len > sched.num_blocks * sched.block_size:
        return None  # a sequence might outgrow the pool: the general step aborts it
    state = core.kv_state
    if state.loads or state.pending:
        return None  # a load landing during the step is applied by the general path's poll
    kv = sched.kv_cache_manager
    need = [r for r in batch if not kv.allocation_is_noop(r, 1)]
    if len(need) > kv.get_num_free_blocks():
        return None  # each needs at most one block; with fewer free the general step may preempt
    for request in need:  # in running order, as schedule() allocates
        kv.allocate_slots(request, 1)
    batch = list(batch)  # finishing requests leave the scheduler's list below
    total_context = 0
    for request in batch:
        request.num_computed_tokens += 1
        total_context += request.num_tokens  # a decode chunk's context: every known token
    runner = core.runner
    cost = core.profile.step_time_s(len(batch), total_context, has_prefill=False)
    runner.last_step_s = cost
    runner.busy_s += cost
    core.clock.spend(cost)
    vocab, max_len = core.vocab_size, sched.max_model_len
    ids, tokens, finished = [], [], []
    for request in batch:
        out = request.output_token_ids
        token = sim_next_token(out[-1] if out else request.prompt_token_ids[-1], request.num_tokens, vocab,
                               request.eos_token_id)
        request.append_output_token(token)
        ids.append(request.request_id)
        tokens.append(token)
        decision = check_stop(request, max_len)
        if decision is not None:
            finished.append((request, decision))
    for request, decision in finished:
        request.stop_reason = decision.stop_reason
        sched.finish_requests(request.request_id, decision.status)
    core.num_steps += 1
    core.num_computed_tokens_total += len(batch)
    return FastStep(len(batch), ids, tokens, frozenset(r.request_id for r, _ in finished))
