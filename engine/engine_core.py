"""The engine core: scheduler + model runner + sampler, stepping in one loop.

It works on token ids only; tokenization, detokenization and stop strings live in the front end
(:mod:`pdserve.engine.frontend.output_processor`), so the core can run in its own process (the async engine) and CPU
work on text never stalls the model step.

With asynchronous scheduling (``SchedulerConfig.async_scheduling``) one step stays in flight: :meth:`step`
schedules and launches step N+1, then waits for step N's sampled tokens, applies them and returns step N's
outputs, so the device never idles while the host schedules (see :mod:`pdserve.engine.core.scheduler`).

Fault isolation (see :mod:`pdserve.engine.faults`): a request is checked against the model before it joins a
batch (:meth:`EngineCore.validate`, the front end's rule set). If a step still fails with an error that is not a
device fault, the failure is pinned on requests, which are aborted (their output carries ``error``, their blocks
are freed) while the engine serves on:

* sampling, the one stage that reads per-request parameters, retries a failed batch row by row, so exactly the
  rows that fail again are aborted (:meth:`Sampler.launch`);
* the forward pass reads only validated token ids and the engine's own block tables; if it fails, the requests
  of that step are aborted (the failure cannot be narrowed further without re-running the model), and the
  requests outside the step are untouched.

A device fault (CUDA error, device or host out of memory) propagates: the device's state is no longer trusted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.scheduler import Scheduler
from pdserve.engine.core.sched_output import SchedulerOutput, SchedulerStats
from pdserve.engine.faults import describe, is_device_fault
from pdserve.engine.outputs import EngineCoreOutput
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.step_trace import StepTrace
from pdserve.engine.frontend.validation import validate_prompt
from pdserve.engine.heap import freeze_startup_heap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStat:
    """One step as :meth:`EngineCore.step` ran it (recorded only when asked, for benchmarks).

    ``duration_s`` spans scheduling, the forward pass, sampling (which waits for the GPU) and the scheduler
    update; with asynchronous scheduling, where those overlap with the neighbouring steps, it runs from the
    previous step's completion (or this step's launch, if later) to this one's, so durations still add up to
    the wall time. ``total_context`` sums every scheduled sequence's context after this step (the KV it
    attends to).
    """

    duration_s: float
    num_tokens: int
    num_seqs: int
    num_decodes: int  # one-token chunks; a step is pure decode when num_decodes == num_seqs
    total_context: int


@dataclass
class _InFlight:
    """A launched step whose sampled tokens the scheduler has not received yet (asynchronous scheduling)."""

    sched_out: SchedulerOutput
    sample_ids: list[str]  # the requests of the sampled rows, in row order
    sample: Any  # a PendingSample
    start: float  # when the step() that launched it began
    hidden: Any = None  # the step's hidden states, when a speculative proposer reads them (EAGLE, Medusa)


@dataclass
class EngineCoreRequest:
    """A request as the core receives it (already tokenized and validated by the front end)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    eos_token_id: int | None = None
    # Disaggregation: the handle of KV a prefill engine saved for this prompt (decode role), or None.
    kv_transfer_params: dict | None = None


class EngineCore:
    """Owns the scheduler, the model runner and the sampler; :meth:`step` runs one batch."""

    def __init__(self, config: EngineConfig) -> None:
        from pdserve.engine.executor import build_executor
        from pdserve.engine.sampler import Sampler

        if config.parallel.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size={config.parallel.data_parallel_size}: data parallelism runs several "
                             f"engine cores behind `pdserve serve`; one engine core (or the offline LLM) takes only 1")
        self.config = config
        # The model runner itself on one device; with tensor/pipeline parallelism, the multi-process executor
        # (same interface: the logits of each step come back here, engine/executor).
        self.runner = build_executor(config)
        self.vocab_size = self.runner.vocab_size
        self.max_model_len = config.model.max_model_len
        cache, sched = config.cache, config.scheduler
        # Disaggregation: the connector's worker half runs in the model runner, its scheduler half in the
        # scheduler (engine/kv_transfer). Built now that the cache it describes exists.
        self.kv_connector, kv_scheduler_half = None, None
        if config.kv_transfer.connector and hasattr(self.runner, "build_kv_connector"):
            # Tensor parallel: a worker half in every rank on its own heads, a stand-in here (executor/kv_ranks).
            kv_scheduler_half, self.kv_connector = self.runner.build_kv_connector()
        elif config.kv_transfer.connector:
            from pdserve.engine.kv_transfer.factory import build_connector

            kv_scheduler_half, self.kv_connector = build_connector(config, self.runner.kv_caches)
            self.runner.attach_kv_connector(self.kv_connector)
        device_type = getattr(self.runner.device, "type", str(self.runner.device))
        self.async_scheduling = sched.use_async_scheduling(device_type)
        # Speculative decoding (engine/spec_decode). A step with drafts runs synchronously (its drafts follow from
        # the tokens the step before emitted): see _needs_sync_step.
        self.spec = _spec_decoder(config, self.vocab_size, self.runner)
        self._in_flight: _InFlight | None = None
        self._failed_outputs: list[EngineCoreOutput] = []  # requests aborted by a failure, not yet reported
        self._last_done = 0.0  # when the last step completed (perf_counter), for StepStat durations
        self._step_trace = StepTrace.from_env(config.kv_transfer.role)  # PDSERVE_STEP_TRACE (engine/step_trace)
        # Unfinished requests whose sampling may read their tokens on the host (penalties, min_tokens): while
        # one needs it, steps run synchronously (see _needs_sync_step).
        self._host_token_ids: set[str] = set()
        self.scheduler = Scheduler(
            block_size=cache.block_size,
            num_blocks=self.runner.num_blocks,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_num_seqs=sched.max_num_seqs,
            max_model_len=self.max_model_len,
            enable_prefix_caching=cache.enable_prefix_caching,
            enable_chunked_prefill=sched.enable_chunked_prefill,
            hash_seed=cache.hash_seed,
            hash_algo=cache.hash_algo,
            enable_kv_events=cache.kv_events_endpoint is not None,  # published by the core process for routers
            kv_connector=kv_scheduler_half,
            async_scheduling=self.async_scheduling,
        )
        self.sampler = Sampler(self.runner.device)
        self.structured = _structured_output_manager(config, self.vocab_size)
        if self.spec is not None:
            self.spec.structured = self.structured
        self._tokenizer: Any = None  # loaded on first use (bad_words)
        # Startup left millions of long-lived objects (torch, transformers, the model's modules) that every full
        # garbage collection would scan again: measured, a ~300 ms pause every hundred or so steps, 3 ms a step
        # on average at batch 128 (engine/heap.py).
        freeze_startup_heap(collect=False)  # no extra pass: tests build hundreds of engines
        self.num_steps = 0
        self.num_computed_tokens_total = 0  # tokens the model actually ran (prefix hits excluded)
        self.step_stats: list[StepStat] | None = None  # per-step records while record_step_stats is on
        logger.info("engine core ready: model=%s blocks=%d x %d tokens, device=%s, async scheduling %s",
                    config.model.model, self.runner.num_blocks, cache.block_size, self.runner.device,
                    "on" if self.async_scheduling else "off")

    # ------------------------------------------------------------------ requests
    def validate(self, req: EngineCoreRequest) -> None:
        """Raise ``ValueError`` with a clear message if the request can never be served, or if its id is taken
        by a request in any state (waiting, loading, running, or finished with blocks held for a KV peer)."""
        if not isinstance(req.sampling_params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        validate_prompt(req.prompt_token_ids, req.sampling_params, self.max_model_len, self.vocab_size)
        structured = req.sampling_params.structured_outputs
        if structured is not None:
            if self.structured is None:
                raise ValueError("structured_outputs needs the model's tokenizer, and this model has none")
            if structured.num_prefix_tokens >= len(req.prompt_token_ids):
                raise ValueError(f"structured_outputs.num_prefix_tokens ({structured.num_prefix_tokens}) must be "
                                 f"less than the prompt's {len(req.prompt_token_ids)} tokens")
        if req.sampling_params.num_generated_prompt_tokens >= len(req.prompt_token_ids):
            raise ValueError(f"num_generated_prompt_tokens ({req.sampling_params.num_generated_prompt_tokens}) must "
                             f"be less than the prompt's {len(req.prompt_token_ids)} tokens")
        if req.sampling_params.prompt_logprobs is not None and req.kv_transfer_params is not None:
            raise ValueError("prompt_logprobs cannot be combined with kv_transfer_params: a request whose KV is "
                             "loaded never computes its prompt's logits")
        if self.scheduler.has_request_id(req.request_id):
            raise ValueError(f"request id {req.request_id!r} is already in use")

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; ``ValueError`` (nothing queued) for one that cannot be served."""
        self.validate(req)
        request = Request(request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
                          sampling_params=req.sampling_params, eos_token_id=req.eos_token_id,
                          arrival_time=req.arrival_time or time.time(),
                          kv_transfer_params=req.kv_transfer_params, cache_salt=req.sampling_params.cache_salt)
        try:
            if req.sampling_params.bad_words:
                request.bad_words_token_ids = self._bad_words_token_ids(req.sampling_params.bad_words)
            if self.structured is not None:
                self.structured.add_request(request)  # compiles off the loop; the scheduler waits for it
            self.sampler.add_request(request)
            self.scheduler.add_request(request)
        except Exception as exc:
            self.sampler.remove_request(req.request_id)
            if is_device_fault(exc):
                raise
            if isinstance(exc, ValueError):
                raise
            raise ValueError(f"the request cannot be served: {describe(exc)}") from exc
        params = req.sampling_params
        if self.async_scheduling and (params.needs_penalties or params.min_tokens > 0 or params.bad_words
                                      or params.structured_outputs is not None):
            self._host_token_ids.add(req.request_id)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Finish requests from outside the step (aborts, stop strings found by the front end)."""
        if self.spec is not None:
            for rid in request_ids:
                request = self.scheduler.get_request(rid)
                if request is not None:
                    self.spec.finished(request, completed=False)
        self.scheduler.finish_requests(list(request_ids), status)
        for rid in request_ids:
            self.sampler.remove_request(rid)

    def has_unfinished_requests(self) -> bool:
        """Requests to serve, or a step still in flight (drivers keep stepping until it is applied)."""
        return self._in_flight is not None or self.scheduler.has_unfinished_requests()

    def get_stats(self) -> SchedulerStats:
        stats = self.scheduler.get_stats()
        if self.structured is not None:
            stats = dataclasses.replace(stats, structured_output=self.structured.stats.to_dict())
        if self.spec is not None:
            stats = dataclasses.replace(stats, spec_decode=self.spec.stats.to_dict())
        return stats

    def record_step_stats(self, enable: bool = True) -> None:
        """Start (with a fresh list) or stop recording a :class:`StepStat` per step into ``step_stats``."""
        self.step_stats = [] if enable else None

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[EngineCoreOutput]:
        """Schedule one batch, run the model, sample, and report what each request got.

        With asynchronous scheduling the outputs are those of the previous step (launched by the previous call),
        and this call's step stays in flight; a call may return nothing (the first one, say).
        """
        if not self.async_scheduling:
            return self._step_sync()
        if self._needs_sync_step():
            outputs = self._finish_in_flight()
            failed, self._failed_outputs = self._failed_outputs, []
            return failed + outputs + self._step_sync()
        start = time.perf_counter()
        self.scheduler.allow_drafts = False  # launched without waiting: verification needs a synchronous step
        sched_out = self.scheduler.schedule()
        launched = None
        if sched_out.is_empty:
            self._start_transfers(sched_out)
            if self._in_flight is None:  # nothing runs: wait a little for transfers or grammars instead of spinning
                return self._idle() + self._drain_finished_without_step()
        else:
            try:
                launched = self._launch(sched_out, start)
            except Exception as exc:
                self._failed_outputs.extend(self._fail_step(sched_out, exc))
        outputs = self._finish_in_flight()
        self._in_flight = launched
        failed, self._failed_outputs = self._failed_outputs, []
        return failed + outputs + self._drain_finished_without_step()

    def _step_sync(self) -> list[EngineCoreOutput]:
        start = time.perf_counter()
        # Drafts only when the last proposal gave some; otherwise this is the non-speculative step exactly (no
        # drafts scheduled, nothing verified, the plain sampler), decided in O(1).
        drafting = self.spec is not None and self.spec.drafting
        self.scheduler.allow_drafts = drafting
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            self._start_transfers(sched_out)
            return self._idle() + self._drain_finished_without_step()
        try:
            logits = self._execute(sched_out)
        except Exception as exc:
            return self._fail_step(sched_out, exc) + self._drain_finished_without_step()
        hidden = getattr(self.runner, "last_hidden", None)
        sample_ids = [c.request_id for c in sched_out.chunks if c.sample]
        spec_tokens: dict[str, list[int]] = {}
        split = None
        if drafting:  # rows of chunks with drafts are verified; the others sampled as usual
            try:
                split = self.spec.verify(logits, sched_out, {rid: self.scheduler.get_request(rid)
                                                             for rid in sample_ids}, self.sampler)
            except Exception as exc:
                return self._fail_step(sched_out, exc) + self._drain_finished_without_step()
            logits, sample_ids = split.logits, split.sample_ids
        requests = [self.scheduler.get_request(rid) for rid in sample_ids]
        # Filled on the CPU while the device still runs the forward pass queued above.
        bitmask, mask_errors = self._fill_bitmask(requests)
        result = self.sampler.sample(logits, requests, bitmask)
        if split is not None:
            try:  # queued before the sampler's results, so their wait covered it: no second wait for the device
                spec_tokens = split.spec_tokens
            except Exception as exc:
                return self._fail_step(sched_out, exc) + self._drain_finished_without_step()
        failed = self._fail_rows(sample_ids, {**result.errors, **mask_errors})
        return (failed + self._apply(sched_out, sample_ids, result, start, spec_tokens, hidden)
                + self._drain_finished_without_step())

    def _start_transfers(self, sched_out: SchedulerOutput) -> None:
        """A step without a forward pass still carries the connector's instructions (loads queued at admission,
        releases, finished prefills to serve): hand them to the worker half now, or they would be lost. Loads
        started here (like those of a launched step) are ordered after every step already launched, which may
        still write into blocks freed since (see :meth:`KVConnectorWorker.start_load_kv`)."""
        if self.kv_connector is not None and sched_out.kv_connector_metadata is not None:
            self.kv_connector.bind_connector_metadata(sched_out.kv_connector_metadata)
            self.kv_connector.start_load_kv()

    def _idle(self) -> list[EngineCoreOutput]:
        """Nothing to run and no step in flight: pick up finished transfers, waiting briefly for them (or for
        grammars still compiling) rather than spinning; returns the outputs of requests failed meanwhile."""
        self._poll_kv_transfers(idle=True)
        if self.structured is not None:
            self.structured.wait_for_compiles(timeout=0.01)
        failed, self._failed_outputs = self._failed_outputs, []
        return failed

    def _launch(self, sched_out: SchedulerOutput, start: float) -> _InFlight:
        """Queue a step's forward pass and sampling on the device; nothing here waits for it. Placeholder
        inputs take the tokens of the step in flight, read on the device."""
        from pdserve.engine.worker.input_batch import SampledTokens

        prev = self._in_flight
        sampled = None
        if prev is not None and prev.sample_ids:
            sampled = SampledTokens({rid: i for i, rid in enumerate(prev.sample_ids)}, prev.sample.token_ids)
        logits = self._execute(sched_out, sampled)
        sample_ids = [c.request_id for c in sched_out.chunks if c.sample]
        requests = [self.scheduler.get_request(rid) for rid in sample_ids]
        # No constrained row gets here while its previous token is pending (_needs_sync_step), so the matchers
        # are current.
        bitmask, mask_errors = self._fill_bitmask(requests)
        pending = self.sampler.launch(logits, requests, bitmask)
        # Failed rows are aborted now; the scheduler skips their placeholder tokens when the step is applied.
        self._failed_outputs.extend(self._fail_rows(sample_ids, {**pending.errors, **mask_errors}))
        return _InFlight(sched_out, sample_ids, pending, start, getattr(self.runner, "last_hidden", None))

    def _execute(self, sched_out: SchedulerOutput, sampled: Any = None) -> Any:
        """The forward pass, plus the prompt logprobs of the requests that asked (stored on them until sent)."""
        from pdserve.engine import prompt_logprobs

        sched_out.prompt_logprobs = prompt_logprobs.plan(sched_out, self.scheduler.get_request)
        logits = (self.runner.execute_model(sched_out) if sampled is None
                  else self.runner.execute_model(sched_out, sampled=sampled))
        for rid, (start_pos, rows) in getattr(self.runner, "prompt_logprobs_output", {}).items():
            request = self.scheduler.get_request(rid)
            if request is not None:
                prompt_logprobs.store(request, start_pos, rows)
        return logits

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        from pdserve.engine.logits_processors import tokenize_bad_words

        if self._tokenizer is None:
            if self.config.model.tokenizer_path is None:
                raise ValueError("bad_words needs the model's tokenizer, and this model has none")
            from pdserve.engine.frontend.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.model.tokenizer_path)
        return tokenize_bad_words(self._tokenizer, words)

    def _finish_in_flight(self) -> list[EngineCoreOutput]:
        """Wait for the step in flight (if any), apply it, and return its outputs."""
        done, self._in_flight = self._in_flight, None
        if done is None:
            return []
        result = done.sample.result()  # the one wait for the device
        return self._apply(done.sched_out, done.sample_ids, result, max(done.start, self._last_done),
                           hidden=done.hidden)

    def _fill_bitmask(self, requests: list[Request]) -> tuple[Any, dict[int, str]]:
        if self.structured is None:
            return None, {}
        return self.structured.fill_bitmask(requests)

    def _needs_sync_step(self) -> bool:
        """Whether a request may sample next with penalties (they read every earlier token), before its
        ``min_tokens`` (the sampler counts its known outputs) or under a structured-output constraint (its
        bitmask follows every earlier token; overlapping it with the step in flight is future work), or when the
        last proposal gave some request drafts (speculative decoding: drafts are guessed from every earlier
        token, and the scheduler attaches them only when no step is in flight): then the step in flight must land
        first. When adaptive k proposes nothing (large batches, low acceptance) the steps overlap again."""
        if self.spec is not None and self.spec.drafting:
            return True
        for rid in list(self._host_token_ids):
            req = self.scheduler.get_request(rid)
            if req is not None:
                params = req.sampling_params
                if (params.needs_penalties or params.structured_outputs is not None or params.bad_words
                        or req.num_output_tokens + req.num_pending_tokens < params.min_tokens):
                    return True
            self._host_token_ids.discard(rid)  # finished, or past min_tokens for good
        return False

    def _apply(self, sched_out: SchedulerOutput, sample_ids: list[str], result: Any,
               start: float, spec_tokens: dict[str, list[int]] | None = None,
               hidden: Any = None) -> list[EngineCoreOutput]:
        """Hand a step's sampled tokens to the scheduler; returns the outputs of the requests that got one.
        ``spec_tokens``: what verification emitted for the requests whose chunks carried drafts; ``hidden``:
        the step's hidden states when the proposer reads them."""
        sampled: dict[str, Any] = dict(zip(sample_ids, result.token_ids))
        num_before = {}
        if spec_tokens:
            sampled.update(spec_tokens)
            num_before = {rid: self.scheduler.get_request(rid).num_output_tokens for rid in spec_tokens}
        updated = self.scheduler.update_from_output(sched_out, sampled)
        self._poll_kv_transfers(idle=False)
        self.num_steps += 1
        self.num_computed_tokens_total += sched_out.total_num_tokens
        self._last_done = time.perf_counter()
        if self.step_stats is not None or self._step_trace is not None:
            chunks = sched_out.chunks
            stat = StepStat(self._last_done - start, sched_out.total_num_tokens, len(chunks),
                            sum(1 for c in chunks if c.num_tokens == 1), sum(c.context_len for c in chunks))
            if self.step_stats is not None:
                self.step_stats.append(stat)
            if self._step_trace is not None:
                self._step_trace.write(stat)
        row_of = {rid: i for i, rid in enumerate(sample_ids)}
        now = time.time()
        outputs = []
        for req in updated:
            rid = req.request_id
            row = row_of.get(rid)
            row_lp = result.logprobs[row] if result.logprobs is not None and row is not None else None
            lp = [row_lp] if row_lp is not None else None
            new = req.output_token_ids[num_before[rid]:] if rid in num_before else [req.output_token_ids[-1]]
            outputs.append(EngineCoreOutput(
                request_id=rid, new_token_ids=new, new_logprobs=lp,
                finish_reason=req.status.finish_reason, stop_reason=req.stop_reason,
                num_cached_tokens=req.num_cached_tokens, kv_transfer_params=req.kv_transfer_output,
                num_external_cached_tokens=req.num_external_cached_tokens,
                timing=req.timing_marks(now) if req.num_output_tokens == 1 else None,
                prompt_logprobs=_take_prompt_logprobs(req)))
            if req.is_finished:
                self.sampler.remove_request(rid)
                if self.spec is not None:
                    self.spec.finished(req, completed=True)
        if self.spec is not None:
            try:
                self.spec.observe(sched_out, hidden, self.scheduler.get_request, self.scheduler.num_running)
                self.spec.propose(updated, self.scheduler.num_running)
            except Exception as exc:  # a proposer's failure costs this step's guesses, not the requests
                if is_device_fault(exc):
                    raise
                logger.exception("speculative proposer failed; no drafts this step")
                for req in updated:
                    req.spec_token_ids = []
                self.spec.num_proposed = 0
        return outputs

    def _fail_step(self, sched_out: SchedulerOutput, exc: Exception) -> list[EngineCoreOutput]:
        """The forward pass failed: abort the requests of this step (all of them; see the module docstring)."""
        if is_device_fault(exc):
            raise exc
        logger.exception("engine step failed; aborting its %d requests", len(sched_out.chunks))
        reason = f"the engine failed on this request's step: {describe(exc)}"
        return self._fail_requests({c.request_id: reason for c in sched_out.chunks})

    def _fail_rows(self, sample_ids: list[str], errors: dict[int, str]) -> list[EngineCoreOutput]:
        """Abort the requests whose sampling failed (rows the sampler isolated)."""
        if not errors:
            return []
        return self._fail_requests({sample_ids[row]: f"sampling failed for this request: {text}"
                                    for row, text in errors.items()})

    def _fail_requests(self, reasons: dict[str, str]) -> list[EngineCoreOutput]:
        """Abort requests the engine failed on, free their blocks, and report each with its ``error``."""
        outputs = []
        for rid, reason in reasons.items():
            request = self.scheduler.get_request(rid)
            if request is None:
                continue  # already finished
            logger.warning("aborting request %s: %s", rid, reason)
            # Set before finishing: an aborted request's KV is never saved for (or held by) a transfer peer.
            request.abort_reason = reason
            self.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
            outputs.append(EngineCoreOutput(request_id=rid, new_token_ids=[], finish_reason="abort",
                                            stop_reason=reason, error=reason))
        return outputs

    def _poll_kv_transfers(self, idle: bool) -> None:
        """Hand the connector's finished loads, saves and releases to the scheduler.

        ``idle``: nothing was scheduled; the engine is only waiting on transfers, so it sleeps a little instead of
        spinning (shorter while a request waits for its KV than while only held blocks wait for a peer).
        """
        if self.kv_connector is None:
            return
        out = self.kv_connector.get_finished()
        self.scheduler.update_from_kv_transfer(out)
        if idle and out.is_empty:
            time.sleep(0.002 if self.scheduler.num_loading else 0.02)

    def check_health(self) -> None:
        """Raise if the engine can no longer step (a parallel engine's worker died); cheap, called while idle."""
        check = getattr(self.runner, "check_health", None)
        if check is not None:
            check()

    def shutdown(self) -> None:
        """Stop the KV connector's threads and server, and a parallel engine's workers."""
        if self.kv_connector is not None:
            self.kv_connector.shutdown()
        stop_workers = getattr(self.runner, "shutdown", None)
        if stop_workers is not None:
            stop_workers()
        if self.structured is not None:
            self.structured.shutdown()
        if self._step_trace is not None:
            self._step_trace.close()

    def _drain_finished_without_step(self) -> list[EngineCoreOutput]:
        """Requests the scheduler finished on its own (e.g. one that can never fit the KV pool)."""
        outs = []
        for req in self.scheduler.take_finished_without_output():
            self.sampler.remove_request(req.request_id)
            if self.spec is not None:
                self.spec.finished(req, completed=False)
            outs.append(EngineCoreOutput(request_id=req.request_id, new_token_ids=[],
                                         finish_reason=req.status.finish_reason,
                                         stop_reason=req.abort_reason or req.stop_reason))
        return outs


def _spec_decoder(config: EngineConfig, vocab_size: int, runner: Any) -> Any:
    """The speculative decoder when ``config.speculative`` asks for one, else None."""
    if config.speculative is None:
        return None
    from pdserve.engine.spec_decode.decoder import SpecDecoder

    return SpecDecoder(config.speculative, vocab_size, runner)


def _take_prompt_logprobs(req: Request) -> list | None:
    """A request's prompt logprobs, with its first output token only (then dropped: they are sent once)."""
    if req.sampling_params.prompt_logprobs is None or req.num_output_tokens != 1:
        return None
    rows, req.prompt_logprobs = req.prompt_logprobs or [], None
    return rows


def _structured_output_manager(config: EngineConfig, vocab_size: int) -> Any:
    """The structured-output manager, or None for a model without a tokenizer (constrained requests are refused).
    The backend (tokenizer and vocabulary tables) is built on first use, in the compile pool."""
    tokenizer_path = config.model.tokenizer_path
    if tokenizer_path is None:
        return None
    from pdserve.engine.structured_output.manager import StructuredOutputManager

    def make_backend() -> Any:
        from pdserve.engine.frontend.tokenizer import load_tokenizer
        from pdserve.engine.structured_output.backend import XgrammarBackend

        return XgrammarBackend(load_tokenizer(tokenizer_path), vocab_size)

    return StructuredOutputManager(make_backend)
