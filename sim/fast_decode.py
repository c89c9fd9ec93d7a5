"""Runs of pure-decode steps of a simulated engine core, without the general step loop.

Most steps of a decode pod decode one token for each running request and do nothing else. The general path
(:meth:`EngineCore.step`: ``schedule()`` building chunks, the runner, the sampler, ``update_from_output`` building
outputs, the cluster reading them) costs tens of microseconds a token in Python, which caps ``pdserve sim`` at a
few 10^4 simulated tokens per second of wall time. :func:`fast_decode_steps` makes the state changes that path
makes for a run of such steps, in one pass over the batch:

- the same tokens (:func:`~pdserve.sim.core.sim_next_token`, inlined), and each step's time from the cost model
  for the same batched tokens and growing total context, spent on the core's clock step by step (the same
  float sums);
- each request's blocks for the whole run in one ``allocate_slots`` of the real :class:`KVCacheManager`, after
  its tokens are known, so the pool, evictions and the prefix cache end where the single steps leave them
  (which request got which free block may differ; no result depends on block ids);
- requests that reach ``max_tokens`` or the context limit end the run, retired through the scheduler with the
  real stop check.

A run stops before a step that starts at ``until`` or later (the caller's next event for this pod), after the
step in which a request ends, and before the pool could run short. It declines (returns None, and the caller
runs the general step) whenever the next step could be anything else: a request waiting, loading or held, a
prompt chunk, drafts or stop tokens, a KV load in flight, or too few free blocks (a preemption).
``tests/sim/test_sim_fast_forward.py`` checks a cluster run with it against one without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine.core.stop import check_stop
from pdserve.sim.core import SimEngineCore


@dataclass(frozen=True)
class FastRun:
    """What a run of fast-forwarded steps did."""

    request_ids: list[str]  # the batch, in order
    tokens: list[list[int]]  # each request's new tokens, one per step
    step_ends: list[float]  # the clock at the end of each step
    finished: frozenset[str]  # requests that ended in the last step
    quiet_until: float  # no request ends in a step that starts before this, until a new input comes


def _steps_left(request: Any, max_len: int) -> int:
    """Tokens until ``max_tokens`` or the context limit ends the request."""
    left = max_len - request.num_tokens
    max_tokens = request.sampling_params.max_tokens
    return left if max_tokens is None else min(left, max_tokens - len(request.output_token_ids))


def _new_blocks(kv: Any, batch: list[Any], steps: int) -> int:
    size = kv.block_size
    return sum(max(0, -(-(r.num_computed_tokens + steps) // size) - kv.num_held_slots(r) // size) for r in batch)


def fast_decode_steps(core: SimEngineCore, until: float) -> FastRun | None:
    """Run ``core``'s next pure-decode steps that start before ``until`` (see the module docstring); None if the
    next step is not pure decode."""
    sched = core.scheduler
    batch = sched.pure_decode_batch()
    if batch is None or core.step_stats is not None or core.spec is not None or core.structured is not None:
        return None
    if sched.max_model_len > sched.num_blocks * sched.block_size:
        return None  # a sequence might outgrow the pool: the general step aborts it
    state = core.kv_state
    if state.loads or state.pending:
        return None  # a load landing during the step is applied by the general path's poll
    if any(r.sampling_params.stop_token_ids for r in batch):
        return None
    max_len = sched.max_model_len
    left = [_steps_left(r, max_len) for r in batch]
    most = min(left)
    n = len(batch)
    context = sum(r.num_tokens for r in batch)  # a decode chunk attends every known token
    step_time = core.profile.step_time_s
    costs: list[float] = []
    t = core.clock.now()
    while len(costs) < most and t < until:
        cost = step_time(n, context, False)
        costs.append(cost)
        t += cost
        context += n
    kv = sched.kv_cache_manager
    free = kv.get_num_free_blocks()
    if _new_blocks(kv, batch, len(costs)) > free:
        lo, hi = 0, len(costs)  # the longest run whose blocks fit (each step needs at most one a request)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _new_blocks(kv, batch, mid) <= free else (lo, mid - 1)
        del costs[lo:]
    k = len(costs)
    if k == 0:
        return None
    batch = list(batch)  # finishing requests leave the scheduler's list below
    vocab = core.vocab_size - 1
    tokens = []
    for request in batch:
        out = request.output_token_ids
        last, length, eos = (out[-1] if out else request.prompt_token_ids[-1]), request.num_tokens, request.eos_token_id
        new = []
        for _ in range(k):
            # sim_next_token, inlined (the one loop run per simulated token)
            last = 1 + (last * 31 + length * 7) % vocab
            if last == eos:
                last = 1 if eos != 1 else 2
            length += 1
            new.append(last)
        out.extend(new)
        tokens.append(new)
    for request in batch:  # in running order, as schedule() allocates
        if not kv.allocation_is_noop(request, k):
            kv.allocate_slots(request, k)
        request.num_computed_tokens += k
    runner, clock = core.runner, core.clock
    ends = []
    for cost in costs:
        runner.busy_s += cost
        clock.spend(cost)
        ends.append(clock.now())
    runner.last_step_s = costs[-1]
    finished = []
    for request, steps in zip(batch, left):
        if steps == k:
            decision = check_stop(request, max_len)
            if decision is None:
                raise AssertionError(f"request {request.request_id} should have stopped")
            request.stop_reason = decision.stop_reason
            sched.finish_requests(request.request_id, decision.status)
            finished.append(request.request_id)
    core.num_steps += k
    core.num_computed_tokens_total += n * k
    return FastRun([r.request_id for r in batch], tokens, ends, frozenset(finished),
                   _quiet_until(core, [(r, s - k) for r, s in zip(batch, left) if s > k]))


def _quiet_until(core: SimEngineCore, rest: list[tuple[Any, int]]) -> float:
    """A time before which no step of ``core`` that starts ends a request, absent new inputs: the batch stays
    the same until the next one ends (after ``m`` more steps), and no step is cheaper than the next one."""
    now = core.clock.now()
    if not rest:
        return now
    m = min(s for _, s in rest)
    batch = [r for r, _ in rest]
    if _new_blocks(core.scheduler.kv_cache_manager, batch, m) > core.scheduler.kv_cache_manager.get_num_free_blocks():
        return now  # a preemption could shrink the batch (and its steps) first
    cheapest = core.profile.step_time_s(len(batch), sum(r.num_tokens for r in batch), False)
    return now + (m - 1) * cheapest * (1 - 1e-9)  # the margin: the steps' times are summed one by one
