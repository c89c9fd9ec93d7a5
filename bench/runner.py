"""Runs one load level: requests arrive by a gamma process (Poisson when burstiness is 1) or as fast as a fixed
concurrency allows, and each is timed by :func:`~.client.send_request`."""

from __future__ import annotations

import asyncio
import math
import random
import time

import httpx

from pdserve.bench.client import Endpoint, RequestResult, send_request
from pdserve.bench.datasets import BenchRequest


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request. Gamma(shape=burstiness, mean=1/rate): burstiness 1 is a Poisson
    process, below 1 burstier, above 1 more regular. An infinite rate sends everything at once."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


async def run_load(endpoint: Endpoint, requests: list[BenchRequest], rate: float, burstiness: float = 1.0,
                   max_concurrency: int | None = None, seed: int = 0,
                   progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send every request; returns the results (in request order) and the run's wall time."""
    from tqdm.asyncio import tqdm

    limit = max_concurrency or len(requests)
    gate = asyncio.Semaphore(limit)
    limits = httpx.Limits(max_connections=limit + 8, max_keepalive_connections=limit + 8)
    bar = tqdm(total=len(requests), disable=not progress, unit="req", leave=False)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            async with gate:
                result = await send_request(client, endpoint, req, t0)
            bar.update(1)
            return result

        tasks = []
        for gap, req in zip(arrival_gaps(len(requests), rate, burstiness, seed), requests):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return list(results), duration
