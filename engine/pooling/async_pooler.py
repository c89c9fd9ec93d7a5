"""``AsyncPooler``: the engine client of a ``--runner pooling`` server.

It loads the model in the serving process and runs :class:`~.runner.PoolingRunner` steps in one worker thread
(the event loop never waits for the model). Concurrent requests are batched: whatever has queued while a step
ran goes into the next step, up to the scheduler's token budget. A request whose caller left before its step
started is dropped; one whose step is running completes and is discarded. Generation is refused: a pooling
server serves embeddings only.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.config import EngineConfig
from pdserve.engine.frontend.errors import EngineDeadError, EngineNotReadyError, QueueFullError
from pdserve.engine.frontend.tokenizer import load_tokenizer
from pdserve.engine.frontend.validation import tokenize_prompt

logger = logging.getLogger(__name__)


class WrongRunnerError(ValueError):
    """A generation request sent to a pooling server (a client error: a 400)."""


@dataclass
class _Job:
    prompts: list[list[int]]
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AsyncPooler:
    """Serves embeddings from a pooling runner; ``await start()`` loads the model. See the module docstring."""

    runner_kind = "pooling"

    def __init__(self, config: EngineConfig, pooling_type: str = "mean", normalize: bool = True,
                 max_waiting: int = 0) -> None:
        """``max_waiting`` (0: unbounded): requests queued for a step beyond which new ones get a 429."""
        self.config = config
        self.model_name = config.model.served_model_name
        self.max_model_len = config.model.max_model_len
        self.tokenizer = load_tokenizer(config.model.tokenizer_path)
        self.pooling_type = pooling_type
        self.normalize = normalize
        self.max_waiting = max_waiting
        self.hidden_size = int(config.model.hf_config.hidden_size)
        self._runner: Any = None
        self._queue: list[_Job] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._dead: BaseException | None = None

    async def start(self) -> "AsyncPooler":
        from pdserve.engine.pooling.runner import PoolingRunner

        self._runner = await asyncio.to_thread(PoolingRunner, self.config, self.pooling_type, self.normalize)
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pdserve-pooler")
        return self

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all(EngineDeadError("the engine is shut down"))

    # ------------------------------------------------------------------ EngineClient
    @property
    def is_ready(self) -> bool:
        return self._runner is not None and self._dead is None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def get_stats(self) -> None:
        return None

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise WrongRunnerError("this server runs the pooling runner (--runner pooling) and serves /v1/embeddings "
                               "only; generation needs a server started with --runner generate")

    async def abort(self, request_id: str) -> None:
        return None  # embeddings are not addressable by id; a caller that leaves drops its own job

    # ------------------------------------------------------------------ embeddings
    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Pooled vectors of token-id prompts, in order. ``ValueError`` for a prompt beyond the context."""
        if self._dead is not None:
            raise self._dead
        if self._runner is None or self._wake is None:
            raise EngineNotReadyError("the engine is still starting")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) > self.max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens, beyond the model's context of "
                                 f"{self.max_model_len} tokens")
            vocab = self._runner.runner.vocab_size
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {vocab})")
        if self.max_waiting and len(self._queue) >= self.max_waiting:
            raise QueueFullError(f"the engine's waiting queue is full ({self.max_waiting} requests)")
        job = _Job(prompts)
        self._queue.append(job)
        self._wake.set()
        return await job.done

    async def _loop(self) -> None:
        assert self._wake is not None
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    jobs = self._take_batch()
                    if not jobs:
                        continue
                    flat = [p for j in jobs for p in j.prompts]
                    try:
                        vectors = await asyncio.to_thread(self._runner.embed, flat)
                    except Exception as exc:  # fail this batch's requests; a device fault ends the engine
                        logger.exception("pooling step failed")
                        for j in jobs:
                            if not j.done.done():
                                j.done.set_exception(exc if isinstance(exc, ValueError) else
                                                     EngineDeadError(f"the pooling step failed: {exc}"))
                        if not isinstance(exc, ValueError):
                            self._dead = EngineDeadError(f"the pooling step failed: {exc}")
                            self._fail_all(self._dead)
                            return
                        continue
                    rows = vectors.tolist()
                    for j in jobs:
                        part, rows = rows[:len(j.prompts)], rows[len(j.prompts):]
                        if not j.done.done():
                            j.done.set_result(part)
        except asyncio.CancelledError:
            raise

    def _take_batch(self) -> list[_Job]:
        """Queued jobs (callers still waiting) up to the token budget; at least one."""
        budget = self._runner.max_batch_tokens
        jobs, tokens = [], 0
        while self._queue:
            job = self._queue[0]
            if job.done.done():  # the caller left (cancelled) before its step
                self._queue.pop(0)
                continue
            size = sum(len(p) for p in job.prompts)
            if jobs and tokens + size > budget:
                break
            jobs.append(self._queue.pop(0))
            tokens += size
        return jobs

    def _fail_all(self, exc: BaseException) -> None:
        for job in self._queue:
            if not job.done.done():
                job.done.set_exception(exc)
        self._queue.clear()
