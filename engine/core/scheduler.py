"""The scheduler: one loop in which every request's computed tokens chase its known tokens.

There is no prefill or decode mode. Each step has a token budget (``max_num_batched_tokens``) and a sequence
limit (``max_num_seqs``). Running requests go first, in admission order: a decode needs one token, a prompt
being prefilled in chunks needs the rest of its prompt (cut to the budget). Waiting requests are then admitted
first come, first served while budget, sequence slots and blocks last; a prefix-cache hit simply starts them
with some tokens already computed. A chunk that reaches the end of its request's known tokens samples one.
In the output, one-token chunks (decodes) come first, then the others, each group in scheduling order.

When a running request needs a block and none is free, the most recently admitted running request is preempted
(its blocks are freed and it later recomputes everything, helped by the prefix cache) until one is.

With a KV connector (disaggregation, ``engine/kv_transfer``), admission also asks how many prompt tokens can be
loaded from outside: their blocks are allocated, the request waits (``WAITING_FOR_REMOTE_KV``) while the
connector fills them, and :meth:`update_from_kv_transfer` puts it back at the head of the queue with those
tokens computed (or fewer, if the load failed and the policy is to recompute). A finished request whose blocks
the connector still needs (saves in flight, a peer's pull) is held until the connector releases it.

Usage per step (synchronous: call ``update_from_output`` before the next ``schedule``)::

    out = scheduler.schedule()
    sampled = run_model_and_sample(out)          # {request_id: token} for chunks with sample=True
    updated = scheduler.update_from_output(out, sampled)
    aborted = scheduler.take_finished_without_output()

With ``async_scheduling`` one step may be in flight while the next is scheduled: ``schedule()`` (N+1) may come
before ``update_from_output`` (N), and updates come in step order. A token sampled in step N is *pending* until
its update (``Request.num_pending_tokens``); step N+1 already decodes it, its input a placeholder the runner fills
on the device. A request whose pending token surely ends it by length is not scheduled again. A stop on EOS or a
stop token is only seen after step N+1 was scheduled: the request's row of step N+1 is computed for nothing and
its update ignored (the request is finished by then)::

    host    schedule N+1 | launch N+1 | wait N, update N | schedule N+2 | launch N+2 | wait N+1, update N+1
    device  ... step N ...............| step N+1 ..................................| step N+2 ...
"""

from __future__ import annotations

import logging
import numbers
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from pdserve.engine.core.kv_cache_manager import KVCacheManager
from pdserve.engine.core.kv_events import KVCacheEvent
from pdserve.engine.core.sched_output import (PLACEHOLDER_TOKEN_ID, ScheduledChunk, SchedulerOutput,
                                              SchedulerStats)
from pdserve.engine.core.stop import check_stop
from pdserve.engine.kv_transfer.base import KVLoadError
from pdserve.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class Scheduler:
    """Decides, step by step, which tokens of which requests the model computes."""

    def __init__(self, *, block_size: int, num_blocks: int, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int, enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 hash_seed: int = 0, hash_algo: str = "sha256", enable_kv_events: bool = False,
                 kv_connector: Any = None, async_scheduling: bool = False) -> None:
        for name, value in (("block_size", block_size), ("num_blocks", num_blocks), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens), ("max_model_len", max_model_len)):
            # numbers.Integral also admits numpy integers, which a runner may compute num_blocks as.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.block_size = int(block_size)
        self.num_blocks = int(num_blocks)
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.max_num_seqs = int(max_num_seqs)
        self.max_model_len = int(max_model_len)
        self.enable_chunked_prefill = enable_chunked_prefill
        self.kv_cache_manager = KVCacheManager(self.block_size, self.num_blocks, enable_prefix_caching, hash_seed,
                                               hash_algo, self.max_model_len, enable_kv_events)
        self._requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order: the tail is the newest
        self._left_running: set[str] = set()  # finished since the last schedule(), for the runner
        self._finished_without_output: list[Request] = []
        self._num_preemptions = 0
        # The KV connector's scheduler half (KVConnectorScheduler), or None.
        self.kv_connector = kv_connector
        self._loading: dict[str, tuple[Request, int]] = {}  # id -> (request, tokens being loaded for it)
        self._loaded: set[str] = set()  # waiting again after a load: its blocks are allocated already
        self._held: dict[str, Request] = {}  # finished; blocks kept until the connector releases them
        # Scheduling on pending tokens (see the module docstring). The requests each step samples for, kept by
        # object: an id may be reused by a new request before the update of a step of the old one arrives.
        self.async_scheduling = async_scheduling
        self._step_id = 0
        self._sampled_in: dict[int, list[Request]] = {}
        # Speculative decoding: whether this schedule() may attach drafts (the engine core clears it for steps it
        # launches asynchronously, whose runner path samples one row per chunk).
        self.allow_drafts = True

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ``ValueError`` for a duplicate id, an empty or over-long prompt."""
        rid = request.request_id
        if self.has_request_id(rid):
            raise ValueError(f"request id {rid!r} is already in use")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {rid!r} has an empty prompt")
        if request.num_prompt_tokens > self.max_model_len:
            raise ValueError(f"request {rid!r} has {request.num_prompt_tokens} prompt tokens, more than "
                             f"max_model_len {self.max_model_len}")
        request.status = RequestStatus.WAITING
        self._requests[rid] = request
        self._waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside the step (client aborts, stop strings): free blocks, leave the queues.

        Unknown or already finished ids are ignored, so a late abort is harmless.
        """
        if not status.finished:
            raise ValueError(f"finish_requests needs a finished status, got {status}")
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            request = self._requests.get(rid)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self._running.remove(request)
            elif request.status == RequestStatus.WAITING_FOR_REMOTE_KV:
                del self._loading[rid]  # its blocks stay held until the load ends (see _retire)
            else:
                self._waiting.remove(request)
            self._retire(request, status)

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request by id (None once it has finished)."""
        return self._requests.get(request_id)

    def has_request_id(self, request_id: str) -> bool:
        """Whether the id belongs to a request in any state: waiting, loading, running, or finished with its
        blocks still held for a KV transfer peer (a new request must never take over that block table)."""
        return request_id in self._requests or request_id in self._held

    def has_unfinished_requests(self) -> bool:
        """Requests to serve, or finished ones whose blocks a KV transfer still holds."""
        return bool(self._requests or self._held)

    @property
    def num_loading(self) -> int:
        """Requests waiting for a KV connector to load their external tokens."""
        return len(self._loading)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks and advance each scheduled request's ``num_computed_tokens``."""
        chunks: list[ScheduledChunk] = []
        preempted: set[str] = set()
        budget = self._schedule_running(chunks, preempted)
        # After a preemption memory is tight: admitting someone now would only get it (or others) preempted.
        if not preempted:
            self._schedule_waiting(chunks, budget)
        # The runner's contract: one-token chunks (decodes) lead the batch, so it can hand them to a decode
        # kernel as one group. Order does not matter otherwise: the runner writes the whole step's KV before
        # any attention reads it.
        chunks = [c for c in chunks if c.num_tokens == 1] + [c for c in chunks if c.num_tokens != 1]
        self._step_id += 1
        out = SchedulerOutput(chunks=chunks, finished_request_ids=self._left_running,
                              preempted_request_ids=preempted, step_id=self._step_id)
        self._left_running = set()
        requests = self._requests
        sampling = [requests[c.request_id] for c in chunks if c.sample]
        if sampling:
            self._sampled_in[self._step_id] = sampling
        if self.kv_connector is not None:
            out.kv_connector_metadata = self.kv_connector.build_connector_meta(out)
        return out

    def update_from_output(self, sched_out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append each sampled token, apply stop conditions, free the blocks of requests that finished.

        ``sampled`` maps the id of every chunk with ``sample=True`` to its new token, or, for a chunk with drafts
        (speculative decoding), to the list of tokens verification emitted: the accepted drafts and one more.
        The slots of rejected drafts are rolled back (``num_computed_tokens``; blocks that held only them are
        freed), and tokens after one that stops the request are dropped. Returns the requests that got tokens
        this step, in chunk order; finished ones carry a finished status (and ``stop_reason``).
        Requests finished or aborted between ``schedule()`` and now are skipped: with asynchronous scheduling
        that includes a request that stopped in the previous step (its row here was computed for nothing).
        A request preempted since (its blocks freed, waiting to recompute) still gets its token.
        """
        scheduled = self._sampled_in.pop(sched_out.step_id, None)
        if scheduled is None:  # an output built by hand (tests), not by schedule()
            scheduled = [r for r in (self._requests.get(c.request_id) for c in sched_out.chunks if c.sample)
                         if r is not None and r.num_pending_tokens > 0]
        todo = []
        for request in scheduled:
            request.num_pending_tokens -= 1
            if not request.is_finished:
                todo.append(request)
        missing = [r.request_id for r in todo if r.request_id not in sampled]
        if missing:
            raise ValueError(f"no sampled token for requests {missing} whose chunks asked for one")
        finished = False
        num_drafts = {c.request_id: c.num_draft_tokens for c in sched_out.chunks if c.num_draft_tokens}
        for request in todo:
            value = sampled[request.request_id]
            tokens = value if isinstance(value, list) else [value]
            num_rejected = num_drafts.get(request.request_id, 0) + 1 - len(tokens)
            if num_rejected < 0:
                raise ValueError(f"request {request.request_id!r} got {len(tokens)} tokens from one step")
            request.num_computed_tokens -= num_rejected
            decision = None
            for token in tokens:
                request.append_output_token(token)
                decision = check_stop(request, self.max_model_len)
                if decision is not None:
                    break
            if decision is not None:
                request.stop_reason = decision.stop_reason
                if request.status != RequestStatus.RUNNING:  # preempted while its token was in flight
                    self._waiting.remove(request)
                self._retire(request, decision.status)
                finished = True
            elif num_rejected:
                self.kv_cache_manager.free_excess_blocks(request, request.num_tokens)
        if finished:
            self._running = [r for r in self._running if not r.is_finished]
        return todo

    def update_from_kv_transfer(self, output: Any) -> None:
        """Apply what the connector's worker half finished (a ``KVConnectorOutput``): loaded requests go back
        to the head of the queue, failed loads follow the failure policy, released holds free their blocks."""
        connector = self.kv_connector
        connector.update_connector_output(output)
        now = time.time()
        for rid, nbytes in output.loaded_bytes.items():
            entry = self._loading.get(rid)
            if entry is not None:
                entry[0].kv_load_bytes += nbytes
        for rid in output.finished_loading:
            entry = self._loading.pop(rid, None)
            if entry is not None:
                entry[0].kv_load_ended_at = now
                self._resume_after_load(*entry)
        for rid, failure in output.failed_loading.items():
            entry = self._loading.pop(rid, None)
            if entry is None:
                continue
            request, num_external = entry
            request.kv_load_ended_at = now
            try:
                self._resume_after_load(request, connector.load_failed(request, num_external, failure))
            except KVLoadError as exc:
                self._abort_by_engine(request, str(exc))
        for rid in connector.take_released():
            released = self._held.pop(rid, None)
            if released is not None:
                self.kv_cache_manager.free(released)

    def take_finished_without_output(self) -> list[Request]:
        """Requests the scheduler aborted itself since the last call (see ``abort_reason``); they got no token."""
        done, self._finished_without_output = self._finished_without_output, []
        return done

    def pure_decode_batch(self) -> list[Request] | None:
        """The running requests, in order, if the next :meth:`schedule` would give each of them exactly one
        decode token and do nothing else: no request waiting, loading or held, no drafts, no step in flight,
        the whole batch within the token budget. None otherwise. (The simulator fast-forwards such steps,
        :mod:`pdserve.sim.fast_decode`; the engine itself does not read it.)"""
        if (not self._running or self._waiting or self._loading or self._held or self._sampled_in
                or len(self._running) > self.max_num_batched_tokens):
            return None
        for request in self._running:
            if (request.num_tokens - request.num_computed_tokens != 1 or request.num_pending_tokens
                    or request.spec_token_ids):
                return None
        return self._running

    # ------------------------------------------------------------------ stats and cache
    def get_stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(num_running=len(self._running), num_waiting=len(self._waiting),
                              kv_cache_usage=kv.usage, num_free_blocks=kv.get_num_free_blocks(),
                              num_total_blocks=self.num_blocks, prefix_cache_queries=kv.prefix_cache_queries,
                              prefix_cache_hits=kv.prefix_cache_hits, num_preemptions=self._num_preemptions,
                              kv_capacity_tokens=self.num_blocks * self.block_size,
                              kv_transfer=self._kv_transfer_stats())

    def take_kv_events(self) -> list[KVCacheEvent]:
        """Prefix-cache events since the last call (empty unless ``enable_kv_events``)."""
        return self.kv_cache_manager.take_events()

    def reset_prefix_cache(self) -> bool:
        """Forget all cached blocks; refused (False) while requests hold blocks."""
        return self.kv_cache_manager.reset_prefix_cache()

    # ------------------------------------------------------------------ internals
    def _schedule_running(self, chunks: list[ScheduledChunk], preempted: set[str]) -> int:
        """Give each running request its next chunk, preempting the newest on a block shortage.

        Returns the budget left. The newest running request is at the tail, after the one being scheduled,
        so a preemption never takes back a chunk already given out this step.
        """
        budget = self.max_num_batched_tokens
        use_pending = self.async_scheduling
        i = 0
        while i < len(self._running) and budget > 0:
            request = self._running[i]
            pending = request.num_pending_tokens if use_pending else 0
            remaining = request.num_tokens + pending - request.num_computed_tokens
            if (remaining <= 0 or (not self.enable_chunked_prefill and remaining > budget)
                    or (pending and self._ends_by_length(request))):
                i += 1
                continue
            if not self._fits_pool(request):
                del self._running[i]
                self._abort_by_engine(request, self._pool_too_small(request))
                continue
            num_new = min(remaining, budget)
            drafts = self._drafts_for(request, remaining, budget)
            block_ids = self.kv_cache_manager.allocate_slots(request, num_new + len(drafts))
            if block_ids is None and drafts:
                drafts = []  # no room for the lookahead: a plain decode, preempting others only for that
                block_ids = self.kv_cache_manager.allocate_slots(request, num_new)
            while block_ids is None:
                victim = self._running.pop()
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is request:
                    break
                block_ids = self.kv_cache_manager.allocate_slots(request, num_new)
            if block_ids is None:
                break  # it preempted itself, and it was the last running request
            chunks.append(self._make_chunk(request, num_new, block_ids, drafts))
            if request.spec_token_ids:
                request.spec_token_ids = []  # guesses for this step only: the next ones follow from its outcome
            budget -= num_new + len(drafts)
            i += 1
        return budget

    def _schedule_waiting(self, chunks: list[ScheduledChunk], budget: int) -> None:
        """Admit waiting requests in order until the budget, the sequence slots or the blocks run out."""
        kv = self.kv_cache_manager
        # The connector said "ask again later", or the grammar is still compiling: the others may go first.
        later: list[Request] = []
        while self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
            request = self._waiting[0]
            if request.num_pending_tokens:
                # Preempted while its last token was in flight; it recomputes once that token is known (the
                # update comes before the next schedule, so this only waits a step).
                break
            if not self._fits_pool(request):
                self._waiting.popleft()
                self._abort_by_engine(request, self._pool_too_small(request))
                continue
            if request.grammar is not None and not request.grammar.ready:
                later.append(self._waiting.popleft())  # its grammar is compiling: the others go first meanwhile
                continue
            loaded = request.request_id in self._loaded
            computed_blocks, num_cached = ([], 0) if loaded else kv.get_computed_blocks(request)
            # A request asking for prompt logprobs computes its whole prompt (no externally stored KV either).
            if not loaded and self.kv_connector is not None and request.sampling_params.prompt_logprobs is None:
                try:
                    num_external = self.kv_connector.get_num_new_matched_tokens(request, num_cached)
                except KVLoadError as exc:
                    self._waiting.popleft()
                    self._abort_by_engine(request, str(exc))
                    continue
                if num_external is None:  # blocks still being written: the transfer phase has begun
                    if request.kv_load_started_at is None:
                        request.kv_load_started_at = time.time()
                    later.append(self._waiting.popleft())
                    continue
                if num_external:
                    if request.kv_load_started_at is None:
                        request.kv_load_started_at = time.time()
                    if not self._start_load(request, computed_blocks, num_cached, num_external):
                        break
                    continue
                if request.kv_load_started_at is not None and request.kv_load_ended_at is None:
                    request.kv_load_ended_at = time.time()  # waited for blocks that never came: a miss
            start = request.num_computed_tokens if loaded else num_cached
            remaining = request.num_tokens - start
            if not self.enable_chunked_prefill:
                if remaining > self.max_num_batched_tokens:
                    self._waiting.popleft()
                    self._abort_by_engine(request, f"{remaining} tokens to prefill exceed max_num_batched_tokens "
                                                   f"{self.max_num_batched_tokens} and chunked prefill is off")
                    continue
                if remaining > budget:
                    break  # first come, first served: nobody overtakes the head of the queue
            num_new = min(remaining, budget)
            block_ids = kv.allocate_slots(request, num_new, computed_blocks, num_cached)
            if block_ids is None:
                break
            self._waiting.popleft()
            request.status = RequestStatus.RUNNING
            if loaded:
                self._loaded.discard(request.request_id)
            else:
                request.num_cached_tokens = num_cached
                request.num_external_cached_tokens = 0
                request.num_computed_tokens = num_cached
                if self.kv_connector is not None:
                    self.kv_connector.update_state_after_alloc(request, block_ids, 0)
            self._running.append(request)
            chunks.append(self._make_chunk(request, num_new, block_ids))
            budget -= num_new
        self._waiting.extendleft(reversed(later))

    def _start_load(self, request: Request, computed_blocks: list, num_cached: int, num_external: int) -> bool:
        """Allocate the blocks of ``num_external`` tokens the connector will load; False if they do not fit.

        Their hashes are registered only once the request is scheduled again (``delay_caching``): until the load
        lands, another request must not find them in the prefix cache.
        """
        block_ids = self.kv_cache_manager.allocate_slots(request, num_external, computed_blocks, num_cached,
                                                         delay_caching=True)
        if block_ids is None:
            return False
        self._waiting.popleft()
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        request.num_cached_tokens = request.num_computed_tokens = num_cached
        request.num_external_cached_tokens = 0
        self.kv_connector.update_state_after_alloc(request, block_ids, num_external)
        self._loading[request.request_id] = (request, num_external)
        return True

    def _resume_after_load(self, request: Request, num_loaded: int) -> None:
        """The load ended with ``num_loaded`` tokens in place: back to the head of the queue to compute the rest."""
        request.num_computed_tokens += num_loaded
        request.num_cached_tokens += num_loaded  # not computed here: reported like prefix-cache hits
        request.num_external_cached_tokens += num_loaded  # ... and counted apart in the metrics
        request.status = RequestStatus.WAITING
        self._loaded.add(request.request_id)
        self._waiting.appendleft(request)

    def _kv_transfer_stats(self) -> dict | None:
        stats = self.kv_connector.stats if self.kv_connector is not None else None
        return stats.to_dict() if stats is not None else None

    def _make_chunk(self, request: Request, num_new: int, block_ids: list[int],
                    drafts: list[int] | None = None) -> ScheduledChunk:
        if request.first_scheduled_at is None:
            request.first_scheduled_at = time.time()
        start = request.num_computed_tokens
        end = start + num_new
        drafts = drafts or []
        # Advanced now, so the next schedule() continues after this chunk; draft slots optimistically too (the
        # update rolls the rejected ones back).
        request.num_computed_tokens = end + len(drafts)
        known = request.num_tokens
        if end <= known:
            token_ids = _token_slice(request, start, end)
        else:  # decodes a pending token: its value is still on the device (asynchronous scheduling)
            token_ids = _token_slice(request, start, known) + [PLACEHOLDER_TOKEN_ID] * (end - known)
        sample = end == known + request.num_pending_tokens
        if sample:
            request.num_pending_tokens += 1
        return ScheduledChunk(request_id=request.request_id, token_ids=token_ids + drafts, start_pos=start,
                              block_ids=block_ids, sample=sample, num_draft_tokens=len(drafts))

    def _drafts_for(self, request: Request, remaining: int, budget: int) -> list[int]:
        """The drafts a decode chunk carries (speculative decoding): the proposer's tokens, cut to the budget,
        the context limit (their slots must fit ``max_model_len``) and ``max_tokens`` (a draft past the last
        allowed token could never be emitted). Only while no step is in flight (asynchronous scheduling): drafts
        guess what follows the known tokens, and verification needs every earlier token settled."""
        drafts = request.spec_token_ids
        if not drafts or remaining != 1 or self._sampled_in or not self.allow_drafts:
            return []
        n = min(len(drafts), budget - 1, self.max_model_len - request.num_tokens)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            n = min(n, max_tokens - request.num_output_tokens - 1)
        return drafts[:n] if n > 0 else []

    def _ends_by_length(self, request: Request) -> bool:
        """Whether the request's pending tokens surely finish it (``max_tokens`` or the context limit), so
        that scheduling another token for it would be wasted. Stops on token values are not known yet."""
        pending = request.num_pending_tokens
        max_tokens = request.sampling_params.max_tokens
        return ((max_tokens is not None and request.num_output_tokens + pending >= max_tokens)
                or request.num_tokens + pending >= self.max_model_len)

    def _preempt(self, request: Request) -> None:
        """Recompute later: free the blocks, forget progress, wait at the front of the queue.

        With asynchronous scheduling the step in flight may still write this request's KV into the freed
        blocks. That is harmless because device work is ordered: a new owner's writes (and reads) come in later
        steps. A pending token stays pending and is appended by its update; the recomputation starts after.
        """
        self.kv_cache_manager.free(request)
        self._loaded.discard(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._num_preemptions += 1
        self._waiting.appendleft(request)

    def _fits_pool(self, request: Request) -> bool:
        # Blocks are never released mid-request, so the whole sequence must fit in the pool at once.
        num_tokens = request.num_tokens + request.num_pending_tokens
        return self.kv_cache_manager.num_blocks_needed(num_tokens) <= self.num_blocks

    def _pool_too_small(self, request: Request) -> str:
        need = self.kv_cache_manager.num_blocks_needed(request.num_tokens)
        return (f"{request.num_tokens} tokens need {need} KV cache blocks of {self.block_size} tokens, "
                f"but the pool has only {self.num_blocks}")

    def _abort_by_engine(self, request: Request, reason: str) -> None:
        """Finish a request that can never be scheduled, instead of letting it block the queue forever."""
        logger.warning("aborting request %r: %s", request.request_id, reason)
        request.abort_reason = reason
        self._retire(request, RequestStatus.FINISHED_ABORTED)
        self._finished_without_output.append(request)

    def _retire(self, request: Request, status: RequestStatus) -> None:
        """Final bookkeeping for a request already taken out of its queue (or about to be, in bulk).

        With a connector, the connector may keep the blocks (held until it releases them) and may attach a
        transfer handle for the output (``request.kv_transfer_output``).
        """
        rid = request.request_id
        if request.status == RequestStatus.RUNNING:
            self._left_running.add(rid)
        request.status = status
        del self._requests[rid]
        self._loaded.discard(rid)
        if self.kv_connector is not None:
            hold, request.kv_transfer_output = self.kv_connector.request_finished(
                request, self.kv_cache_manager.get_block_ids(request))
            if hold:
                self._held[rid] = request
                return
        # With asynchronous scheduling the step in flight may still write into these blocks: the row of a request
        # that stopped one step late, or an aborted one. Device work is stream-ordered, so a new owner's writes
        # and reads come after it. Such a write never lands in a prefix-cached block: it is the slot of a token
        # that was pending when the step was scheduled, and only blocks full of known tokens are cached.
        self.kv_cache_manager.free(request)


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """``request.all_token_ids[start:end]`` without concatenating the whole sequence (decode is one token)."""
    prompt, n = request.prompt_token_ids, request.num_prompt_tokens
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return request.output_token_ids[start - n:end - n]
    return prompt[start:] + request.output_token_ids[:end - n]
