"""The engine-core process: a busy loop of schedule -> execute -> update, fed over ZeroMQ.

Socket I/O and (de)serialization run in two helper threads so the loop only moves Python objects through
in-process queues; the model step never waits for the API process, and the API process's CPU work (HTTP,
tokenization, detokenization) never waits for the model step::

    API process                         core process
    ───────────                         ────────────────────────────────────────────────────────
    PUSH ──msgpack──▶ PULL ─[input thread: decode]─▶ queue ─▶ busy loop ─▶ queue ─[output thread: encode]─▶ PUSH
                                                                 │                                           │
    PULL ◀───────────────────────────────────────────────────────┴───────────────────── one message per step ┘

When nothing is running the loop blocks on the input queue (waking once a second to notice a dead parent, or
more often to send load reports when KV events are on), so an idle server burns almost no CPU.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

import msgspec
import zmq

from pdserve.engine.async_engine.protocol import (AbortRequests, AddRequests, FatalMessage, FinishRequests,
                                                  ReadyMessage, ResetPrefixCache, ResetPrefixCacheDone, Shutdown,
                                                  StepMessage, client_encoder, core_decoder)
from pdserve.engine.faults import describe, is_device_fault
from pdserve.engine.request import RequestStatus

if TYPE_CHECKING:  # the real class imports torch; this module is imported before the core is built
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine_core import EngineCore

logger = logging.getLogger(__name__)

# Seconds the idle loop waits for input before checking that the parent process is still alive.
_IDLE_POLL_S = 1.0


def _make_engine_core(config: EngineConfig) -> EngineCore:
    from pdserve.engine.engine_core import EngineCore

    return EngineCore(config)


class EngineCoreProc:
    """Runs an :class:`EngineCore` (or a subclass, e.g. the tests' model-free core) behind two ZeroMQ sockets."""

    def __init__(self, core: EngineCore, input_addr: str, output_addr: str,
                 parent_pid: int | None = None) -> None:
        self.core = core
        self.parent_pid = parent_pid
        self._ctx = zmq.Context()
        self._inputs: queue.Queue[Any] = queue.Queue()
        self._outputs: queue.Queue[Any] = queue.Queue()
        self._unscheduled: set[str] = set()  # added, not yet seen scheduled
        self._rejected: list[tuple[str, str]] = []
        self._stop = False
        # Bound here, before the ready message, so the client's queued messages flow in right away; the socket
        # is then used only by the input thread.
        in_sock = self._ctx.socket(zmq.PULL)
        in_sock.bind(input_addr)
        self._in_thread = threading.Thread(target=self._input_loop, args=(in_sock,), daemon=True,
                                           name="core-input")
        self._out_sock = self._ctx.socket(zmq.PUSH)
        self._out_sock.setsockopt(zmq.LINGER, 2000)
        self._out_sock.connect(output_addr)
        self._out_thread = threading.Thread(target=self._output_loop, daemon=True, name="core-output")
        # Routers follow this engine's prefix cache and load through its KV events (engine/kv_event_publisher.py).
        self._events = None
        self._idle_poll_s = _IDLE_POLL_S
        endpoint = core.config.cache.kv_events_endpoint
        if endpoint:
            from pdserve.engine.kv_event_publisher import KVEventPublisher

            self._events = KVEventPublisher(endpoint)
            self._idle_poll_s = min(_IDLE_POLL_S, self._events.report_interval_s)

    # ------------------------------------------------------------------ threads
    def _input_loop(self, sock: zmq.Socket) -> None:
        decoder = core_decoder()
        while True:
            try:
                frame = sock.recv()
            except zmq.ContextTerminated:
                break
            try:
                self._inputs.put(decoder.decode(frame))
            except msgspec.DecodeError as exc:  # a client bug; never kill the core for it
                logger.error("engine core: undecodable message dropped: %s", exc)
        sock.close(linger=0)

    def _output_loop(self) -> None:
        encoder = client_encoder()
        while True:
            msg = self._outputs.get()
            if msg is None:
                break
            self._out_sock.send(encoder.encode(msg))

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        self._in_thread.start()
        self._out_thread.start()
        core = self.core
        self._outputs.put(ReadyMessage(vocab_size=int(core.vocab_size), max_model_len=int(core.max_model_len),
                                       num_blocks=core.scheduler.num_blocks,
                                       block_size=core.scheduler.block_size))
        try:
            while not self._stop:
                changed = self._drain_inputs(block=not core.has_unfinished_requests())
                if self._stop:
                    break
                if self._parent_gone():
                    logger.warning("engine core: parent process is gone; exiting")
                    break
                core.check_health()  # a parallel engine's dead worker ends the core even while it idles
                outputs, step_tokens, scheduled = [], 0, []
                if core.has_unfinished_requests():
                    start = time.time()
                    before = core.num_computed_tokens_total
                    outputs = core.step()
                    step_tokens = core.num_computed_tokens_total - before
                    scheduled = self._newly_scheduled(outputs, start)
                    changed = True
                if changed:
                    self._outputs.put(StepMessage(timestamp=time.time(), outputs=outputs, scheduled=scheduled,
                                                  rejected=self._rejected, stats=core.get_stats(),
                                                  num_step_tokens=step_tokens))
                    self._rejected = []
                if self._events is not None:
                    self._events.publish(core.scheduler.take_kv_events(), core.get_stats())
        except SystemExit:  # SIGTERM: the client is already shutting down
            raise
        except BaseException as exc:  # report, then exit: the client fails every pending request
            logger.exception("engine core failed")
            self._outputs.put(FatalMessage(message=f"{type(exc).__name__}: {exc}",
                                           traceback=traceback.format_exc()))
            raise
        finally:
            self._close()

    def _drain_inputs(self, block: bool) -> bool:
        """Apply every queued client message; when ``block``, wait (a while) for the first one."""
        changed = False
        while True:
            try:
                msg = self._inputs.get(timeout=self._idle_poll_s) if block else self._inputs.get_nowait()
            except queue.Empty:
                return changed
            block = False
            changed = True
            self._handle(msg)
            if self._stop:
                return changed

    def _handle(self, msg: Any) -> None:
        core = self.core
        if isinstance(msg, AddRequests):
            for req in msg.requests:
                try:
                    core.add_request(req)
                    self._unscheduled.add(req.request_id)
                except Exception as exc:  # one bad request is refused; it never ends the core
                    if is_device_fault(exc):
                        raise
                    self._rejected.append((req.request_id, str(exc) if isinstance(exc, ValueError)
                                           else describe(exc)))
        elif isinstance(msg, AbortRequests):
            core.abort_requests(msg.request_ids)
            self._unscheduled.difference_update(msg.request_ids)
        elif isinstance(msg, FinishRequests):
            core.finish_requests(msg.request_ids, RequestStatus.FINISHED_STOPPED)
            self._unscheduled.difference_update(msg.request_ids)
        elif isinstance(msg, ResetPrefixCache):
            self._outputs.put(ResetPrefixCacheDone(msg.token, core.scheduler.reset_prefix_cache()))
        elif isinstance(msg, Shutdown):
            self._stop = True

    def _newly_scheduled(self, outputs: list[Any], when: float) -> list[tuple[str, float]]:
        """Sequences that left the waiting queue in this step (queue time ends, prefill time starts)."""
        if not self._unscheduled:
            return []
        with_output = {o.request_id for o in outputs}
        done = []
        for rid in self._unscheduled:
            req = self.core.scheduler.get_request(rid)
            if rid in with_output or req is None or req.num_computed_tokens > 0 \
                    or req.status == RequestStatus.RUNNING:
                done.append(rid)
        self._unscheduled.difference_update(done)
        return [(rid, when) for rid in done]

    def _parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _close(self) -> None:
        self._outputs.put(None)
        self._out_thread.join(timeout=5)
        # Closing with the socket's linger flushes a last message (e.g. a FatalMessage); term() then makes the
        # input thread's recv() raise ContextTerminated, so it closes its socket and term() returns.
        self._out_sock.close()
        self._ctx.term()
        if self._events is not None:
            self._events.close()


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int,
                    core_factory: Callable[[EngineConfig], EngineCore] | None = None,
                    log_level: int = logging.INFO) -> None:
    """Process entry point: build the core (model load), announce readiness, then serve until shut down.

    ``core_factory`` (a picklable callable taking ``config``) replaces :class:`EngineCore`; tests use it to run a
    model-free core through the same process and sockets.
    """
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [core] %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group; the API process decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        core = (core_factory or _make_engine_core)(config)
    except BaseException as exc:
        _report_startup_failure(output_addr, exc)
        raise SystemExit(1) from None
    try:
        EngineCoreProc(core, input_addr, output_addr, parent_pid).run()
    except SystemExit:
        raise
    except BaseException:
        raise SystemExit(1) from None


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _report_startup_failure(output_addr: str, exc: BaseException) -> None:
    logger.exception("engine core failed to start")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(output_addr)
    sock.send(client_encoder().encode(FatalMessage(message=f"{type(exc).__name__}: {exc}",
                                                   traceback=traceback.format_exc())))
    sock.close()
    ctx.term()
