"""The engine core's one entry point into speculative decoding: propose after a step, verify within the next.

A step with drafts, as the engine core runs it (synchronously: see docs/speculative-decoding.md)::

    after step N      propose(): each running request that may speculate gets up to k guesses (adaptive k)
    schedule N+1      a decode chunk carries [last token, d_1 .. d_k]; lookahead slots are allocated for them
    forward N+1       the target returns k + 1 logits rows for that chunk (one pass, multi-token query)
    verify()          greedy / rejection sampling picks the accepted drafts and one more token per request
    update N+1        the scheduler appends them and rolls the rejected drafts' KV slots back
"""

from __future__ import annotations

import copy

import torch

from pdserve.engine.core.sched_output import SchedulerOutput
from pdserve.engine.request import Request
from pdserve.engine.spec_decode.adaptive import AdaptiveK
from pdserve.engine.spec_decode.config import SpeculativeConfig
from pdserve.engine.spec_decode.metrics import SpecDecodingStats
from pdserve.engine.spec_decode.proposers import ObservedChunk, build_proposer
from pdserve.engine.spec_decode.rejection import emitted_tokens, rejection_rows
from pdserve.engine.worker.input_batch import small_tensor_to


class SplitStep:
    """A step's logits split between plain rows (for the ordinary sampler) and verified requests.

    ``logits`` ``[S, V]``: the plain rows, in chunk order; ``sample_ids``: their requests. ``spec_tokens``
    (request id -> the tokens verification emitted) waits for the verification's results: read it after
    launching the plain rows' sampling, so that the step waits for the device once (the verification's host copy
    is queued before the sampler's).
    """

    def __init__(self, logits: torch.Tensor, sample_ids: list[str], resolve=None) -> None:
        self.logits = logits
        self.sample_ids = sample_ids
        self._resolve = resolve
        self._spec_tokens: dict[str, list[int]] | None = None if resolve is not None else {}

    @property
    def spec_tokens(self) -> dict[str, list[int]]:
        if self._spec_tokens is None:
            self._spec_tokens = self._resolve()
        return self._spec_tokens


class _HostCopy:
    """Device tensors copied to the host without blocking (pinned memory and an event on CUDA): :meth:`lists`
    waits for the copy and returns them as lists."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        if tensors[0].device.type != "cuda":
            self._host, self._event = list(tensors), None
            return
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for dst, src in zip(self._host, tensors):
            dst.copy_(src, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def lists(self) -> list[list]:
        if self._event is not None:
            self._event.synchronize()
        return [t.tolist() for t in self._host]


def may_speculate(request: Request, constrained_ok: bool = True) -> bool:
    """Requests that never get drafts: those that opted out (``disable_speculation``), those asking for logprobs
    (reported per sampled row only) and those with logits processing (``bad_words`` depends on the tokens before
    each position, which a verify step's later positions would not see). Constrained requests (structured
    output) speculate when ``constrained_ok``: their drafts are cut where the grammar rejects a token and each
    verified row is masked by the grammar's state after the drafts before it."""
    params = request.sampling_params
    return (not params.disable_speculation and (constrained_ok or params.structured_outputs is None)
            and params.logprobs is None and not params.needs_logits_processing)


class SpecDecoder:
    """Owns the proposer, adaptive k and the counters; stateless between steps apart from those."""

    def __init__(self, config: SpeculativeConfig, vocab_size: int, runner=None) -> None:
        self.config = config
        self.runner = runner
        self.proposer = build_proposer(config, vocab_size, runner)
        self.adaptive = AdaptiveK(config)
        self.stats = SpecDecodingStats(config.num_speculative_tokens)
        # Requests the last propose() gave drafts. While 0 the engine runs exactly its non-speculative step: the
        # scheduler attaches no drafts, nothing is verified, the plain sampler samples (see :attr:`drafting`).
        self.num_proposed = 0
        # The engine's structured-output manager (set by the engine core when it has one): drafts of constrained
        # requests are checked and verified under their grammar.
        self.structured = None

    @property
    def drafting(self) -> bool:
        """Whether the next step may carry drafts (the last proposal gave some). When not, the step is the
        non-speculative engine's: same scheduler output, decode CUDA graph, plain sampler, no verification."""
        return self.num_proposed > 0

    # ------------------------------------------------------------------ proposing
    def observe(self, sched_out: SchedulerOutput, hidden, get_request, num_running: int) -> None:
        """Hand the step just applied to a proposer that reads the target's hidden states (EAGLE, Medusa):
        every chunk of a request that may speculate, with its rows of ``hidden`` (one per token of the step).
        Skipped while adaptive k proposes nothing for the batch size (the head then restarts its context)."""
        if self.proposer.hidden_states is None or hidden is None or self.adaptive.batch_k(num_running) == 0:
            return
        items, row = [], 0
        for chunk in sched_out.chunks:
            request = get_request(chunk.request_id)
            if request is not None and not request.is_finished and may_speculate(request, self.structured is not None):
                items.append(ObservedChunk(request, chunk, row))
            row += chunk.num_tokens
        if items:
            self.proposer.observe(items, hidden)

    def propose(self, requests: list[Request], num_running: int) -> None:
        """Set ``spec_token_ids`` of each request (unfinished ones get guesses, the others none).

        O(1) while adaptive k proposes nothing for the batch size (at ``disable_by_batch_size`` running requests
        or more): no request is visited, the proposer is not run, and the runner stops keeping hidden states.
        Only the first such step clears the drafts the proposal before it left (the scheduler clears a request's
        drafts whenever it schedules it, and attaches none while :attr:`drafting` is off)."""
        limit = self.adaptive.batch_k(num_running)
        self._keep_hidden(limit > 0)
        if limit == 0:
            if self.num_proposed:
                for request in requests:
                    request.spec_token_ids = []
                self.num_proposed = 0
            return
        self.num_proposed = 0
        asking, ks = [], []
        for request in requests:
            request.spec_token_ids = []
            if limit == 0 or request.is_finished or not may_speculate(request, self.structured is not None):
                continue
            k = self.adaptive.request_k(request.request_id, limit)
            if k:
                asking.append(request)
                ks.append(k)
        if not asking:
            return
        for request, k, guesses in zip(asking, ks, self.proposer.propose_batch(asking, ks)):
            guesses = guesses[:k]
            if guesses and getattr(request, "grammar", None) is not None:
                try:
                    guesses = self.structured.draft_prefix(request, guesses)
                except ValueError:  # a grammar that failed: the plain path reports it for this request
                    guesses = []
            request.spec_token_ids = guesses
            self.num_proposed += bool(guesses)

    def _keep_hidden(self, keep: bool) -> None:
        """Hidden-state proposers (EAGLE, Medusa): the runner copies each step's hidden states (after a graph
        replay) only while proposals may follow; a step not kept is a gap the head restarts after."""
        if self.proposer.hidden_states is not None and self.runner is not None:
            self.runner.keep_hidden = keep

    def finished(self, request: Request, completed: bool) -> None:
        """A request left the engine; ``completed`` when it stopped or hit its length (not aborted)."""
        self.adaptive.remove(request.request_id)
        if completed:
            self.proposer.on_finished(request)
        self.proposer.forget(request.request_id)

    # ------------------------------------------------------------------ verifying
    def verify(self, logits: torch.Tensor, sched_out: SchedulerOutput, requests: dict[str, Request],
               sampler) -> SplitStep:
        """Split ``logits`` (the runner's rows, see ``ScheduledChunk.num_logits_rows``) and queue the verification
        of the chunks that carry drafts; nothing here waits for the device (penalties aside, which read tokens on
        the host), the returned step's ``spec_tokens`` does. ``requests``: the step's sampled
        requests by id; ``sampler``: the engine's :class:`~pdserve.engine.sampler.Sampler` (its logits
        processing and seeded generators)."""
        plain_rows: list[int] = []
        plain_ids: list[str] = []
        spec_rows: list[int] = []
        spec_chunks = []
        row = 0
        for chunk in sched_out.chunks:
            if not chunk.sample:
                continue
            if chunk.num_draft_tokens:
                spec_rows.extend(range(row, row + chunk.num_logits_rows))
                spec_chunks.append(chunk)
            else:
                plain_rows.append(row)
                plain_ids.append(chunk.request_id)
            row += chunk.num_logits_rows
        if not spec_chunks:
            return SplitStep(logits, plain_ids)
        device = logits.device
        spec_logits = logits if not plain_rows else logits.index_select(
            0, small_tensor_to(spec_rows, torch.long, device))
        plain = logits[:0] if not plain_rows else logits.index_select(0, small_tensor_to(plain_rows, torch.long,
                                                                                          device))
        drafts = [c.token_ids[-c.num_draft_tokens:] for c in spec_chunks]
        finish = self._verify_rows(spec_logits, [requests[c.request_id] for c in spec_chunks], drafts, sampler)

        def resolve() -> dict[str, list[int]]:
            spec_tokens = {}
            for chunk, tokens in zip(spec_chunks, finish()):
                self.stats.observe(chunk.num_draft_tokens, len(tokens) - 1)
                self.adaptive.observe(chunk.request_id, chunk.num_draft_tokens, len(tokens) - 1)
                spec_tokens[chunk.request_id] = tokens
            return spec_tokens

        return SplitStep(plain, plain_ids, resolve)

    def _draft_bitmask(self, requests: list[Request], drafts: list[list[int]], num_rows: int):
        """Structured output: the bitmask of every verified row (all ones for unconstrained requests), or None."""
        if self.structured is None or all(getattr(r, "grammar", None) is None for r in requests):
            return None
        bitmask = torch.full((num_rows, self.structured.backend().bitmask_width), -1, dtype=torch.int32)
        row = 0
        for request, ds in zip(requests, drafts):
            if request.grammar is not None:
                self.structured.fill_draft_bitmasks(request, ds, bitmask, row)
            row += len(ds) + 1
        return bitmask

    def _verify_rows(self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]], sampler):
        """``logits``: ``[R, V]``, each request's ``len(drafts) + 1`` rows in order. Queues the verification and a
        non-blocking copy of its outcome; returns a function that waits for it and gives what each request
        emits."""
        rows: list[Request] = []  # the request each row is sampled as: its outputs so far plus the drafts before
        for request, ds in zip(requests, drafts):
            params = request.sampling_params
            history = params.needs_penalties or params.min_tokens > request.num_output_tokens
            for j in range(len(ds) + 1):
                if history and j:
                    row = copy.copy(request)
                    row.output_token_ids = request.output_token_ids + ds[:j]
                    rows.append(row)
                else:
                    rows.append(request)
        device = logits.device
        x = sampler.process_logits(logits.float(), rows, self._draft_bitmask(requests, drafts, len(rows)))
        argmax = x.argmax(dim=-1)
        num_drafts = [len(ds) for ds in drafts]
        draft_ids = small_tensor_to([t for ds in drafts for t in ds + [0]], torch.long, device)
        if all(r.sampling_params.greedy for r in requests):
            copied = _HostCopy(draft_ids == argmax, argmax)
        else:
            is_bonus = small_tensor_to([j == len(ds) for ds in drafts for j in range(len(ds) + 1)], torch.bool,
                                       device)
            greedy = small_tensor_to([r.sampling_params.greedy for r in rows], torch.bool, device)
            probs = sampler.target_probs(x, rows)
            uniform = torch.rand(len(rows), device=device)
            noise = torch.empty_like(probs).exponential_()
            row = 0
            for request, ds in zip(requests, drafts):
                gen = sampler.generator(request.request_id)
                n = len(ds) + 1
                if gen is not None:  # a seeded request draws from its own generator, as without speculation
                    uniform[row:row + n] = torch.rand(n, device=device, generator=gen)
                    noise[row:row + n].exponential_(generator=gen)
                row += n
            copied = _HostCopy(*rejection_rows(probs, argmax, draft_ids, is_bonus, greedy, uniform, noise))

        forced = getattr(self.proposer, "forced", False)
        kept = [self.proposer.kept.get(r.request_id, 0) for r in requests] if forced else []

        def finish() -> list[list[int]]:
            accepted, emit = copied.lists()
            if forced:  # timing only (oracle_forced): the oracle's kept share, whatever the target computed
                accepted = [j < n for k, n in zip(num_drafts, kept) for j in range(k + 1)]
            return emitted_tokens(num_drafts, drafts, accepted, emit)

        return finish
