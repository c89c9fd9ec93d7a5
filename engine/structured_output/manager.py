"""The engine's structured-output manager: compiles grammars off the model loop and fills each step's bitmask.

Flow of a constrained request::

    add_request ──▶ compile job in the pool (or a cache hit) ──▶ Request.grammar.ready
    scheduler: skips the request at admission until ready (others go first; nothing waits on the compile)
    each step: fill_bitmask(rows) on the CPU  ──▶ sampler applies it to the logits on the device (one op)
               the matcher follows the request's output tokens: it advances over the tokens appended since the
               last step (and rolls back if the output ever shrinks), so it is right after preemption, and
               after disaggregation (it first advances over ``num_prefix_tokens`` prompt tokens)

The bitmask is filled while the device runs the step's forward pass (the runner queues it asynchronously), so
the CPU work overlaps the model. With asynchronous scheduling the mask of step N+1 needs step N's token: the
engine runs synchronous steps while a constrained request is unfinished (see ``EngineCore._needs_sync_step``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pdserve.engine.request import Request
from pdserve.engine.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Compiled grammars kept for reuse (a compiled JSON schema is tens of KB to a few MB).
DEFAULT_CACHE_SIZE = 256


@dataclass
class StructuredOutputStats:
    """Counters since start: requests constrained, compiles and their total time, cache hits."""

    num_requests: int = 0
    num_compiles: int = 0
    compile_seconds: float = 0.0
    cache_hits: int = 0
    num_failed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class RequestGrammar:
    """One request's matcher state (lives on ``Request.grammar``; the scheduler reads only :attr:`ready`)."""

    def __init__(self, params: StructuredOutputsParams, compiled: "Future[Any]") -> None:
        self.params = params
        self._compiled = compiled
        self.matcher: Any = None
        # Tokens the matcher has accepted: num_prefix_tokens prompt tokens, then output tokens.
        self.num_accepted = 0

    @property
    def ready(self) -> bool:
        """Compiled (or failed to): the request may be scheduled."""
        return self._compiled.done()

    def error(self) -> str | None:
        """Why the grammar could not be built, once :attr:`ready`; None on success."""
        exc = self._compiled.exception() if self._compiled.done() else None
        return str(exc) if exc is not None else None

    def compiled(self) -> Any:
        return self._compiled.result()


class StructuredOutputManager:
    """Per engine: a compile pool with a cache keyed by the spec, and bitmask filling for constrained rows.

    ``make_backend`` builds the backend (loading the tokenizer takes a while, so it runs in the pool on first use).
    """

    def __init__(self, make_backend: Callable[[], Any], max_workers: int = 2,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self._make_backend = make_backend
        self._backend: Any = None
        self._backend_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._cache_size = cache_size
        self.stats = StructuredOutputStats()

    # ------------------------------------------------------------------ compiling
    def backend(self) -> Any:
        """The grammar backend (built on first use: loads the tokenizer and its vocabulary tables)."""
        with self._backend_lock:
            if self._backend is None:
                self._backend = self._make_backend()
            return self._backend

    def _compile(self, params: StructuredOutputsParams) -> Any:
        start = time.perf_counter()
        compiled = self.backend().compile(params)
        self.stats.num_compiles += 1
        self.stats.compile_seconds += time.perf_counter() - start
        return compiled

    def add_request(self, request: Request) -> None:
        """Start compiling the request's grammar (or reuse the cached one); sets ``request.grammar``."""
        params = request.sampling_params.structured_outputs
        if params is None:
            return
        key = params.cache_key()
        future = self._cache.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._cache.move_to_end(key)
            self.stats.cache_hits += 1
        else:
            future = self._pool.submit(self._compile, params)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self.stats.num_requests += 1
        request.grammar = RequestGrammar(params, future)

    # ------------------------------------------------------------------ each step
    def fill_bitmask(self, requests: list[Request]) -> tuple[torch.Tensor | None, dict[int, str]]:
        """The token bitmask of a step's sampled rows, ``[S, ceil(V / 32)]`` int32 on the CPU (all ones for
        unconstrained rows), or None when no row is constrained; and the rows that failed (row -> reason: a
        grammar that did not compile, an output token the grammar refuses)."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return None, {}
        backend = self.backend()
        bitmask = torch.full((len(requests), backend.bitmask_width), -1, dtype=torch.int32)
        errors: dict[int, str] = {}
        for i in rows:
            try:
                matcher = self._synced_matcher(requests[i])
                matcher.fill_next_token_bitmask(bitmask, i)
            except ValueError as exc:
                errors[i] = str(exc)
                self.stats.num_failed += 1
        return bitmask, errors

    # ------------------------------------------------------------------ speculative decoding
    def draft_prefix(self, request: Request, drafts: list[int]) -> list[int]:
        """The longest prefix of a proposer's ``drafts`` the grammar allows after the request's known tokens (a
        draft token it rejects ends the draft there); the matcher is left where it was. ``ValueError`` as
        :meth:`fill_bitmask` reports (the request then simply gets no drafts)."""
        matcher = self._synced_matcher(request)
        n = 0
        for token in drafts:
            if not matcher.accept_token(token):
                break
            n += 1
        if n:
            matcher.rollback(n)
        return drafts[:n]

    def fill_draft_bitmasks(self, request: Request, drafts: list[int], bitmask: torch.Tensor, row: int) -> None:
        """Rows ``row .. row + len(drafts)`` of ``bitmask``: the tokens allowed after the known tokens and after
        each draft in turn (what verification masks each of the chunk's logits rows with). The matcher advances
        over the drafts (which :meth:`draft_prefix` checked) and is rolled back to the known tokens."""
        matcher = self._synced_matcher(request)
        matcher.fill_next_token_bitmask(bitmask, row)
        for j, token in enumerate(drafts):
            if not matcher.accept_token(token):
                matcher.rollback(j)
                raise ValueError(f"draft token {token} does not follow the request's {request.grammar.params.kind} "
                                 f"constraint")
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(bitmask, row + j + 1)
            else:  # the draft ended the output (its stop token); the row is never emitted, but keep it a
                # distribution (a point mass on the stop token) rather than all -inf
                bitmask[row + j + 1].zero_()
                if request.eos_token_id is not None:
                    bit = 1 << (request.eos_token_id % 32)
                    bitmask[row + j + 1, request.eos_token_id // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit
        if drafts:
            matcher.rollback(len(drafts))

    def _synced_matcher(self, request: Request) -> Any:
        """The request's matcher, advanced (or rolled back) to its current tokens."""
        state = request.grammar
        error = state.error()
        if error is not None:
            raise ValueError(error)
        if state.matcher is None:
            state.matcher = self.backend().matcher(state.compiled(), request.eos_token_id)
            state.num_accepted = 0
        prefix = state.params.num_prefix_tokens
        target = prefix + request.num_output_tokens
        if state.num_accepted > target:  # tokens taken back (speculative decoding's rejected drafts)
            state.matcher.rollback(state.num_accepted - target)
            state.num_accepted = target
        while state.num_accepted < target:
            k = state.num_accepted
            token = (request.prompt_token_ids[len(request.prompt_token_ids) - prefix + k] if k < prefix
                     else request.output_token_ids[k - prefix])
            if not state.matcher.accept_token(token):
                raise ValueError(f"token {token} does not follow the request's {state.params.kind} constraint")
            state.num_accepted += 1
        return state.matcher

    def wait_for_compiles(self, timeout: float) -> None:
        """Block until a compile in progress ends, or ``timeout`` seconds (for an engine with nothing else to do)."""
        pending = [f for f in self._cache.values() if not f.done()]
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
