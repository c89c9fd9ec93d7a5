"""``AsyncLLM``: the API process's handle on an engine core running in its own process.

It tokenizes and validates requests, sends them to the core, and turns the core's per-step token deltas into
text (detokenization and stop strings run here, see :mod:`pdserve.engine.frontend.output_processor`). Each request
gets an async iterator of :class:`RequestOutput`; leaving the iterator early (client gone, timeout) aborts the request
in the core, which frees its blocks. If the core process dies, every pending request fails with
:class:`EngineDeadError` and :attr:`AsyncLLM.is_ready` turns false.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable, Iterable

import zmq
import zmq.asyncio

from pdserve.engine.async_engine.core_proc import run_engine_core
from pdserve.engine.async_engine.protocol import (AbortRequests, AddRequests, FatalMessage, FinishRequests,
                                                  ReadyMessage, ResetPrefixCache, ResetPrefixCacheDone, Shutdown,
                                                  StepMessage, client_decoder, client_encoder)
from pdserve.engine.async_engine.request_stream import ABORTED, RequestState, RequestStream
from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import SchedulerStats
from pdserve.engine.engine_core import EngineCoreRequest
from pdserve.engine.frontend.errors import EngineDeadError, EngineNotReadyError, QueueFullError, RequestFailedError
from pdserve.engine.frontend.fanout import eos_token_id_of, fan_out, with_default_max_tokens
from pdserve.engine.frontend.output_processor import OutputProcessor
from pdserve.engine.frontend.stats import IterationStats, SequenceTimes, StatLogger, record_all
from pdserve.engine.frontend.tokenizer import load_tokenizer
from pdserve.engine.frontend.validation import tokenize_prompt, validate_prompt
from pdserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "EngineNotReadyError", "QueueFullError", "RequestFailedError",
           "RequestStream"]

PromptType = str | list[int]


class AsyncLLM:
    """Front end of the async engine. Use ``async with AsyncLLM(config) as llm`` or ``await llm.start()``.

    ``stat_loggers`` receive scheduler snapshots and per-step iteration stats (see :mod:`.stats`).
    ``max_waiting`` (0: unbounded) caps the sequences waiting for their first scheduling; beyond it
    :meth:`generate` raises :class:`QueueFullError`. ``core_factory`` replaces the engine core (tests).
    """

    def __init__(self, config: EngineConfig, *, stat_loggers: Iterable[StatLogger] = (), max_waiting: int = 0,
                 core_factory: Callable[[Any], Any] | None = None, tokenizer: Any = None,
                 startup_timeout_s: float = 900.0) -> None:
        self.config = config
        self.model_name = config.model.served_model_name
        self.max_model_len = config.model.max_model_len
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model.tokenizer_path)
        self.eos_token_id = eos_token_id_of(self.tokenizer, config.model.hf_config)
        self.vocab_size = 0  # from the core's ready message
        self.num_blocks = 0
        self.max_waiting = max_waiting
        self.stat_loggers = list(stat_loggers)
        self._core_factory = core_factory
        self._startup_timeout_s = startup_timeout_s
        self._processor = OutputProcessor(self.tokenizer)
        self._requests: dict[str, RequestState] = {}
        self._parent_of: dict[str, str] = {}  # seq id -> request id
        self._times: dict[str, SequenceTimes] = {}  # live sequences
        self._marks: dict[str, dict[str, float]] = {}  # seq id -> timeline marks, from its first token on
        self._unscheduled: set[str] = set()
        self._stats: SchedulerStats | None = None
        self._ready = False
        self._closing = False
        self._dead: EngineDeadError | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._tmpdir: str | None = None
        self._output_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._encoder = client_encoder()
        self._decoder = client_decoder()
        self._resets: dict[int, asyncio.Future[bool]] = {}  # reset_prefix_cache calls awaiting the core

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "AsyncLLM":
        """Build from :meth:`EngineConfig.create` keyword arguments (not started)."""
        return cls(EngineConfig.create(model, **kwargs))

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> "AsyncLLM":
        """Spawn the core process and wait until it has loaded the model. Raises if it fails to start."""
        self._tmpdir = tempfile.mkdtemp(prefix="pdserve-core-")
        in_addr = f"ipc://{self._tmpdir}/in"
        out_addr = f"ipc://{self._tmpdir}/out"
        self._sync_ctx = zmq.Context()
        self._in_sock = self._sync_ctx.socket(zmq.PUSH)
        self._in_sock.setsockopt(zmq.SNDHWM, 0)  # never block the event loop on a send
        self._in_sock.setsockopt(zmq.LINGER, 0)
        self._in_sock.setsockopt(zmq.RECONNECT_IVL, 10)  # the core binds only after loading the model
        # Each side binds the socket it reads and connects the one it writes: a connecting PUSH has its queue
        # from connect() on, so nothing sent before the peer is up (or after it died) blocks or gets lost.
        self._in_sock.connect(in_addr)
        self._async_ctx = zmq.asyncio.Context()
        self._out_sock = self._async_ctx.socket(zmq.PULL)
        self._out_sock.setsockopt(zmq.RCVHWM, 0)
        self._out_sock.setsockopt(zmq.LINGER, 0)
        self._out_sock.bind(out_addr)
        ctx = multiprocessing.get_context("spawn")  # fork would copy the event loop and sockets
        self._proc = ctx.Process(target=run_engine_core, name="pdserve-engine-core",
                                 args=(self.config, in_addr, out_addr, os.getpid(), self._core_factory,
                                       logging.getLogger().getEffectiveLevel()))
        self._proc.start()
        atexit.register(self._stop_core_at_exit)
        loop = self._loop = asyncio.get_running_loop()
        loop.add_reader(self._proc.sentinel, self._on_core_exit)
        try:
            await asyncio.wait_for(self._wait_ready(), self._startup_timeout_s)
        except BaseException:
            await self.shutdown()
            raise
        self._output_task = loop.create_task(self._output_loop(), name="pdserve-engine-outputs")
        return self

    async def _wait_ready(self) -> None:
        while True:
            if self._dead is not None:
                raise self._dead
            if not await self._out_sock.poll(200):
                continue
            msg = self._decoder.decode(await self._out_sock.recv())
            if isinstance(msg, ReadyMessage):
                self.vocab_size, self.num_blocks = msg.vocab_size, msg.num_blocks
                self.max_model_len = msg.max_model_len
                self._ready = True
                return
            if isinstance(msg, FatalMessage):
                raise EngineDeadError(f"engine core failed to start: {msg.message}")

    async def __aenter__(self) -> "AsyncLLM":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the core (cleanly if it answers, else by signal), fail what is pending, release sockets."""
        if self._closing:
            return
        self._closing = True
        self._ready = False
        proc = self._proc
        if proc is not None:
            try:
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            except (ValueError, OSError):
                pass
            if proc.is_alive() and self._send(Shutdown()):
                await asyncio.to_thread(proc.join, timeout_s)
            if proc.is_alive():
                proc.terminate()
                await asyncio.to_thread(proc.join, 5)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        atexit.unregister(self._stop_core_at_exit)
        if self._output_task is not None:
            self._output_task.cancel()
        self._fail_all(EngineDeadError("the engine is shut down"))
        for name in ("_in_sock", "_out_sock"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        for name in ("_sync_ctx", "_async_ctx"):
            ctx = getattr(self, name, None)
            if ctx is not None:
                ctx.term()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _stop_core_at_exit(self) -> None:
        # Last resort when the event loop ended without shutdown() (e.g. a second Ctrl-C): without it the
        # interpreter would wait forever on the non-daemon core process at exit.
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()

    def _on_core_exit(self) -> None:
        if self._proc is not None:
            asyncio.get_running_loop().remove_reader(self._proc.sentinel)
        if self._closing:
            return
        code = self._proc.exitcode if self._proc is not None else None
        logger.error("engine core process exited unexpectedly (exit code %s)", code)
        self._fail_all(EngineDeadError(f"the engine core process exited unexpectedly (exit code {code})"))

    def _fail_all(self, exc: EngineDeadError) -> None:
        self._ready = False
        if self._dead is None:
            self._dead = exc
        for state in self._requests.values():
            state.queue.put_nowait(exc)
        for waiter in self._resets.values():
            if not waiter.done():
                waiter.set_exception(exc)

    # ------------------------------------------------------------------ state
    @property
    def is_ready(self) -> bool:
        """True once the model is loaded and while the core process is alive."""
        return self._ready and self._dead is None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    def get_stats(self) -> SchedulerStats | None:
        """The core's latest scheduler snapshot (None before the first step)."""
        return self._stats

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    def _check_usable(self) -> None:
        if self._dead is not None:
            raise self._dead
        if not self._ready:
            raise EngineNotReadyError("the engine is still starting")

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: PromptType) -> list[int]:
        """Token ids of a prompt (text or ids). ``ValueError`` for anything else."""
        return tokenize_prompt(self.tokenizer, prompt)

    def _build(self, request_id: str, token_ids: list[int], params: SamplingParams,
               kv_transfer_params: dict | None = None) -> list[EngineCoreRequest]:
        """The core requests of one client request, validated by the engine's rule set (nothing registered)."""
        params = with_default_max_tokens(params, len(token_ids), self.max_model_len)
        validate_prompt(token_ids, params, self.max_model_len, self.vocab_size)
        now = time.time()
        return [EngineCoreRequest(sid, token_ids, p, arrival_time=now, eos_token_id=self.eos_token_id,
                                  kv_transfer_params=kv_transfer_params)
                for sid, p in fan_out(request_id, params)]

    def generate(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None, *,
                 stream: bool = True, prompt_text: str | None = None,
                 kv_transfer_params: dict | None = None) -> "RequestStream":
        """Validate and queue one request now; iterate the returned stream for its outputs.

        Raises at once (nothing queued) with ``ValueError`` for an invalid request, :class:`QueueFullError`,
        :class:`EngineNotReadyError` or :class:`EngineDeadError`. Each :class:`RequestOutput` of the stream holds
        one :class:`CompletionOutput` whose ``index`` tells which of the ``n`` sequences it belongs to. With
        ``stream`` the outputs carry deltas (new text and tokens); without it only each sequence's final, whole
        output comes. Closing the stream (or cancelling the task iterating it) aborts what is still running.
        ``kv_transfer_params``: the handle of KV that a prefill engine saved for this prompt (decode role).

        ``request_id`` is the client's label: it comes back in the outputs, and two requests may share it. The
        ids that key engine state are the server's own (random, see :attr:`RequestStream.internal_id`). A
        request that the engine fails on (see :mod:`pdserve.engine.faults`) ends its stream with
        :class:`RequestFailedError`.
        """
        self._check_usable()
        internal_id = uuid.uuid4().hex
        label = request_id or internal_id
        if request_id:
            logger.debug("request %s: client id %r", internal_id, request_id[:200])  # %r: escaped
        token_ids = self.tokenize(prompt)
        text = prompt_text if prompt_text is not None else (prompt if isinstance(prompt, str) else None)
        reqs = self._build(internal_id, token_ids, params, kv_transfer_params)
        if self.max_waiting and len(self._unscheduled) + len(reqs) > self.max_waiting:
            raise QueueFullError(f"the engine's waiting queue is full ({self.max_waiting} sequences)")
        # Encoded before anything is registered: a request that cannot be sent leaves no state behind.
        frame = self._encoder.encode(AddRequests(reqs))
        state = RequestState(internal_id, [r.request_id for r in reqs], stream, label=label)
        self._requests[internal_id] = state
        try:
            for index, r in enumerate(reqs):
                self._processor.add_sequence(r.request_id, internal_id, index, text, token_ids, r.sampling_params,
                                             stream=stream)
                self._times[r.request_id] = SequenceTimes(arrival=r.arrival_time,
                                                          num_prompt_tokens=len(token_ids),
                                                          max_tokens=r.sampling_params.max_tokens or 0)
                self._parent_of[r.request_id] = internal_id
                self._unscheduled.add(r.request_id)
            if not self._send_frame(frame, "AddRequests"):
                raise EngineDeadError("the engine core is not connected")
        except BaseException:
            state.finished.update(state.seq_ids)  # nothing reached the core: nothing to abort there
            for sid in state.seq_ids:
                self._processor.remove(sid)
            self._release(state)
            for sid in state.seq_ids:
                self._forget_seq(sid, "error", time.time(), IterationStats(timestamp=time.time()))
            raise
        self._log(None, IterationStats(timestamp=time.time(), num_requested_output_tokens=sum(
            r.sampling_params.max_tokens or 0 for r in reqs)))
        return RequestStream(self, state)

    async def abort(self, request_id: str) -> None:
        """Abort the live requests with this id or label (no-op if none); their iterators end with no output."""
        states = [st for st in self._requests.values() if request_id in (st.request_id, st.label)]
        for state in states:
            self._release(state)
            state.queue.put_nowait(ABORTED)

    async def reset_prefix_cache(self, timeout_s: float = 10.0) -> bool:
        """Make the core forget every cached prefix block. False (nothing reset) while requests hold blocks."""
        self._check_usable()
        token = uuid.uuid4().int & ((1 << 63) - 1)
        waiter = self._resets[token] = asyncio.get_running_loop().create_future()
        try:
            if not self._send(ResetPrefixCache(token)):
                raise EngineDeadError("the engine core is not connected")
            return await asyncio.wait_for(waiter, timeout_s)
        finally:
            self._resets.pop(token, None)

    def _release(self, state: RequestState) -> None:
        """Forget a request; abort in the core whatever of it is still running."""
        if self._requests.get(state.request_id) is not state:
            return
        del self._requests[state.request_id]
        unfinished = [sid for sid in state.seq_ids if sid not in state.finished]
        if not unfinished:
            return
        now = time.time()
        it = IterationStats(timestamp=now)
        reason = "abort" if self._dead is None else "error"
        for sid in unfinished:
            self._processor.remove(sid)
            self._forget_seq(sid, reason, now, it)
        if self._dead is None and not self._closing:
            self._send(AbortRequests(unfinished))
        self._log(None, it)

    def _forget_seq(self, seq_id: str, reason: str, now: float, it: IterationStats) -> None:
        times = self._times.pop(seq_id, None)
        self._marks.pop(seq_id, None)
        self._parent_of.pop(seq_id, None)
        self._unscheduled.discard(seq_id)
        if times is not None:
            it.finished.append(times.finish(reason, now))

    def _send(self, msg: Any) -> bool:
        """Queue a message for the core without ever blocking; False if no core is connected to take it."""
        return self._send_frame(self._encoder.encode(msg), type(msg).__name__)

    def _send_frame(self, frame: bytes, what: str) -> bool:
        try:
            self._in_sock.send(frame, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:  # a PUSH socket without a peer (the core died or never connected)
            logger.warning("engine core not connected; dropped %s", what)
            return False

    # ------------------------------------------------------------------ outputs
    async def _output_loop(self) -> None:
        try:
            while True:
                msg = self._decoder.decode(await self._out_sock.recv())
                if isinstance(msg, StepMessage):
                    self._on_step(msg)
                    # Let the streams write what this step gave them before the next step is handled. A recv of
                    # an already-queued message completes without yielding, so after any hiccup this loop would
                    # otherwise drain the whole backlog first, every stream silent meanwhile (seen on an H100 as
                    # 50 ms-1.6 s stalls of all streams at once while every engine step took under 7 ms).
                    await asyncio.sleep(0)
                elif isinstance(msg, ResetPrefixCacheDone):
                    waiter = self._resets.pop(msg.token, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(msg.ok)
                elif isinstance(msg, FatalMessage):
                    logger.error("engine core failed: %s\n%s", msg.message, msg.traceback)
                    self._fail_all(EngineDeadError(f"the engine core failed: {msg.message}"))
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave requests hanging forever
            logger.exception("async engine output loop failed")
            self._fail_all(EngineDeadError(f"the engine's output handler failed: {exc}"))

    def _on_step(self, msg: StepMessage) -> None:
        now = time.time()
        it = IterationStats(timestamp=now, num_step_tokens=msg.num_step_tokens)
        for seq_id, when in msg.scheduled:
            times = self._times.get(seq_id)
            if times is not None and times.scheduled is None:
                times.scheduled = when
            self._unscheduled.discard(seq_id)
        for seq_id, reason in msg.rejected:
            state = self._requests.get(self._parent_of.get(seq_id, ""))
            if state is not None:
                self._release(state)
                state.queue.put_nowait(ValueError(reason))
        outputs = []
        for out in msg.outputs:
            if out.error is not None:  # the engine failed on this sequence: the request fails with its reason
                state = self._requests.get(self._parent_of.get(out.request_id, ""))
                if state is not None:
                    state.finished.add(out.request_id)
                    self._forget_seq(out.request_id, "error", now, it)
                    self._processor.remove(out.request_id)
                    self._release(state)
                    state.queue.put_nowait(RequestFailedError(out.error))
                continue
            times = self._times.get(out.request_id)
            if times is not None:
                times.on_tokens(now, len(out.new_token_ids), it, out.num_cached_tokens, out.num_external_cached_tokens)
                if out.timing is not None:  # the first token: the core's marks, when this process queued it
                    # and when the token got here
                    self._marks[out.request_id] = {"arrival": times.arrival, **out.timing, "delivered": now}
            outputs.append(out)
        processed = self._processor.process(outputs)
        if processed.stop_string_finished:
            self._send(FinishRequests(processed.stop_string_finished))
        for ro in processed.request_outputs:
            state = self._requests.get(ro.request_id)
            if state is None:
                continue
            ro.request_id = state.label  # the client's label; internal ids stay inside the server
            comp = ro.outputs[0]
            seq_id = state.seq_ids[comp.index]
            ro.timing = self._marks.get(seq_id)
            if comp.finished and ro.timing is not None:
                ro.timing["finished"] = now  # the last token (a stop string ends it here, not in the core)
            if comp.finished:
                state.finished.add(seq_id)
                self._forget_seq(seq_id, comp.finish_reason or "stop", now, it)
            if state.stream or comp.finished:
                state.queue.put_nowait(ro)
        self._stats = msg.stats
        self._log(msg.stats, it)

    def _log(self, stats: SchedulerStats | None, it: IterationStats) -> None:
        record_all(self.stat_loggers, stats, it)
