"""Data parallelism: ``N`` engine cores behind one API server, for a pod with several GPUs.

Each core is a whole :class:`AsyncLLM` (its own process, scheduler and KV cache; on CUDA core ``i`` runs on
``cuda:i``). :class:`DataParallelLLM` offers the same client interface and sends each new request to the core
with the fewest unfinished requests -- the front end's count of the core's running and waiting sequences, which
includes those sent but not yet scheduled, so a burst does not all land on one core between two stats updates --
ties going to the core that was sent the fewest so far. A request stays on its core (prefix caching is per core).

Scheduler snapshots are summed over the cores for the server's metrics; per-core stat loggers (the server's
``pdserve:engine_*{engine="i"}`` metrics) see each core's own. On Kubernetes the replica stays the unit of scale;
this is for one pod with several GPUs.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from pdserve.engine.async_engine.client import AsyncLLM, PromptType
from pdserve.engine.async_engine.request_stream import RequestStream
from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import SchedulerStats
from pdserve.engine.frontend.errors import EngineDeadError
from pdserve.engine.frontend.fanout import eos_token_id_of
from pdserve.engine.frontend.stats import IterationStats, StatLogger, record_all
from pdserve.engine.frontend.tokenizer import load_tokenizer
from pdserve.engine.sampling_params import SamplingParams


def core_config(config: EngineConfig, index: int, cuda: bool) -> EngineConfig:
    """Core ``index``'s config: one data-parallel rank, on GPU ``index`` when the engine runs on CUDA."""
    parallel = dataclasses.replace(config.parallel, data_parallel_size=1)
    device = dataclasses.replace(config.device, device=f"cuda:{index}") if cuda else config.device
    return dataclasses.replace(config, parallel=parallel, device=device)


def check_data_parallel(config: EngineConfig) -> None:
    """Refuse what data parallelism cannot do yet (before any core starts)."""
    par = config.parallel
    if par.world_size > 1:
        raise ValueError("data_parallel_size cannot be combined with tensor or pipeline parallelism yet")
    if config.kv_transfer.connector:
        raise ValueError("data_parallel_size cannot be combined with a KV connector; on Kubernetes, scale "
                         "prefill and decode pods by replicas")
    if config.cache.kv_events_endpoint is not None:
        raise ValueError("data_parallel_size cannot be combined with a KV-event endpoint (each core would publish "
                         "on the same address)")
    if config.device.device.startswith("cuda:"):
        raise ValueError("with data_parallel_size, core i runs on cuda:i: pass --device cuda (or auto), not one GPU")


class DataParallelLLM:
    """``size`` :class:`AsyncLLM` cores behind one client interface (see the module docstring).

    ``core_stat_loggers[i]`` receive core ``i``'s own snapshots; ``stat_loggers`` receive the sums.
    ``max_waiting`` caps the waiting sequences of each core (0: unbounded).
    """

    def __init__(self, config: EngineConfig, *, stat_loggers: Iterable[StatLogger] = (),
                 core_stat_loggers: Sequence[Iterable[StatLogger]] = (), max_waiting: int = 0,
                 core_factory: Any = None) -> None:
        size = config.parallel.data_parallel_size
        if size < 2:
            raise ValueError("DataParallelLLM needs data_parallel_size >= 2")
        check_data_parallel(config)
        self.config = config
        self.model_name = config.model.served_model_name
        self.max_model_len = config.model.max_model_len
        self.tokenizer = load_tokenizer(config.model.tokenizer_path)
        self.eos_token_id = eos_token_id_of(self.tokenizer, config.model.hf_config)
        cuda = _uses_cuda(config.device.device)
        self._stats = _StatsSum(size, list(stat_loggers))
        per_core = list(core_stat_loggers) or [()] * size
        self.engines = [AsyncLLM(core_config(config, i, cuda), max_waiting=max_waiting, core_factory=core_factory,
                                 tokenizer=self.tokenizer, stat_loggers=[self._stats.for_core(i), *per_core[i]])
                        for i in range(size)]
        self.num_routed = [0] * size

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> "DataParallelLLM":
        """Start every core (concurrently); if one fails, stop the others and raise its error."""
        results = await asyncio.gather(*(e.start() for e in self.engines), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.shutdown()
            raise failed[0]
        return self

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        await asyncio.gather(*(e.shutdown(timeout_s) for e in self.engines))

    async def __aenter__(self) -> "DataParallelLLM":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    # ------------------------------------------------------------------ state
    @property
    def is_ready(self) -> bool:
        return all(e.is_ready for e in self.engines)

    @property
    def dead_error(self) -> EngineDeadError | None:
        """The first dead core's error: one dead core takes the server down (its supervisor restarts it)."""
        return next((e.dead_error for e in self.engines if e.dead_error is not None), None)

    def get_stats(self) -> SchedulerStats | None:
        return self._stats.total()

    @property
    def num_unfinished_requests(self) -> int:
        return sum(e.num_unfinished_requests for e in self.engines)

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: PromptType) -> list[int]:
        return self.engines[0].tokenize(prompt)

    def pick(self) -> int:
        """The core for the next request: fewest unfinished requests, then fewest routed so far."""
        return min(range(len(self.engines)),
                   key=lambda i: (self.engines[i].num_unfinished_requests, self.num_routed[i], i))

    def generate(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None,
                 **kwargs: Any) -> RequestStream:
        """Queue the request on the least-loaded core (see :meth:`AsyncLLM.generate`)."""
        index = self.pick()
        stream = self.engines[index].generate(prompt, params, request_id, **kwargs)
        self.num_routed[index] += 1
        return stream

    async def abort(self, request_id: str) -> None:
        """Abort the request wherever it runs (a no-op on the other cores)."""
        for engine in self.engines:
            await engine.abort(request_id)


def _uses_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch  # only to resolve "auto"; the cores themselves decide the same way

    return torch.cuda.is_available()


class _StatsSum:
    """Keeps each core's latest snapshot; hands the sum to the server-wide loggers on every core's update."""

    def __init__(self, size: int, loggers: list[StatLogger]) -> None:
        self.latest: list[SchedulerStats | None] = [None] * size
        self.loggers = loggers

    def for_core(self, index: int) -> StatLogger:
        return _CoreFeed(self, index)

    def record(self, index: int, stats: SchedulerStats | None, it: IterationStats) -> None:
        if stats is not None:
            self.latest[index] = stats
        record_all(self.loggers, self.total() if stats is not None else None, it)

    def total(self) -> SchedulerStats | None:
        known = [s for s in self.latest if s is not None]
        if not known:
            return None
        total_blocks = sum(s.num_total_blocks for s in known)
        free = sum(s.num_free_blocks for s in known)
        structured: dict[str, Any] = {}
        for s in known:
            for key, value in (s.structured_output or {}).items():
                if isinstance(value, (int, float)):
                    structured[key] = structured.get(key, 0) + value
        return SchedulerStats(
            num_running=sum(s.num_running for s in known), num_waiting=sum(s.num_waiting for s in known),
            kv_cache_usage=(total_blocks - free) / total_blocks if total_blocks else 0.0,
            num_free_blocks=free, num_total_blocks=total_blocks,
            prefix_cache_queries=sum(s.prefix_cache_queries for s in known),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in known),
            num_preemptions=sum(s.num_preemptions for s in known),
            kv_capacity_tokens=sum(s.kv_capacity_tokens for s in known),
            structured_output=structured or None)


@dataclasses.dataclass
class _CoreFeed:
    """The stat logger given to core ``index``: forwards to the sum."""

    target: _StatsSum
    index: int

    def record(self, scheduler_stats: SchedulerStats | None, iteration: IterationStats) -> None:
        self.target.record(self.index, scheduler_stats, iteration)
