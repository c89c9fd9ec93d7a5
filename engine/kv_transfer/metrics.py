"""KV transfer metrics: cumulative counters kept by a connector, exported by the API process.

The connector lives in the engine-core process, ``/metrics`` in the API process, so the counters are a plain
dataclass (:class:`KVTransferStats`) that travels with the scheduler stats; :class:`KVTransferCollector` turns the
latest snapshot into Prometheus families. Every value is cumulative, so a lost snapshot loses nothing.

Exported (labels ``model_name``, ``connector`` and as shown)::

    pdserve:kv_transfer_bytes_total{direction}            bytes saved / loaded
    pdserve:kv_transfer_blocks_total{direction}           blocks saved / loaded
    pdserve:kv_transfer_latency_seconds{direction}        per request: save = first layer to last write,
                                                          load = request admitted to KV in place
    pdserve:kv_transfer_failures_total{reason}            loads or saves that failed, by reason
    pdserve:kv_transfer_blocks_held                       blocks a producer holds under lease (gauge)
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DIRECTIONS = ("save", "load")


@dataclass
class KVTransferStats:
    """Cumulative counters of one connector. Updated from the connector's threads under ``lock``."""

    connector: str = ""
    bytes: dict[str, int] = field(default_factory=lambda: {d: 0 for d in DIRECTIONS})
    blocks: dict[str, int] = field(default_factory=lambda: {d: 0 for d in DIRECTIONS})
    # direction -> cumulative count per bucket (one more than LATENCY_BUCKETS: +Inf), and the sum
    latency_buckets: dict[str, list[int]] = field(
        default_factory=lambda: {d: [0] * (len(LATENCY_BUCKETS) + 1) for d in DIRECTIONS})
    latency_sum: dict[str, float] = field(default_factory=lambda: {d: 0.0 for d in DIRECTIONS})
    failures: dict[str, int] = field(default_factory=dict)
    blocks_held: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def record_transfer(self, direction: str, num_blocks: int, num_bytes: int, seconds: float | None) -> None:
        with self._lock:
            self.blocks[direction] += num_blocks
            self.bytes[direction] += num_bytes
            if seconds is not None:
                # Non-cumulative per bucket here; the collector accumulates when exporting.
                self.latency_buckets[direction][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                self.latency_sum[direction] += seconds

    def record_failure(self, reason: str) -> None:
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1

    def set_blocks_held(self, n: int) -> None:
        with self._lock:
            self.blocks_held = n

    def snapshot(self) -> "KVTransferStats":
        """A consistent copy (safe to send to another process)."""
        with self._lock:
            return KVTransferStats(connector=self.connector, bytes=dict(self.bytes), blocks=dict(self.blocks),
                                   latency_buckets={d: list(v) for d, v in self.latency_buckets.items()},
                                   latency_sum=dict(self.latency_sum), failures=dict(self.failures),
                                   blocks_held=self.blocks_held)

    def to_dict(self) -> dict[str, Any]:
        s = self.snapshot()
        return {"connector": s.connector, "bytes": s.bytes, "blocks": s.blocks,
                "latency_buckets": s.latency_buckets, "latency_sum": s.latency_sum, "failures": s.failures,
                "blocks_held": s.blocks_held}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVTransferStats":
        return cls(**d)


class KVTransferCollector:
    """A Prometheus collector that exports the latest :class:`KVTransferStats` given by ``get_stats``.

    Register it on the API process's registry: ``registry.register(KVTransferCollector(fn, model_name))``.
    """

    def __init__(self, get_stats: Callable[[], KVTransferStats | None], model_name: str) -> None:
        self._get_stats = get_stats
        self._model_name = model_name

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families appear once a connector reports

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        stats = self._get_stats()
        if stats is None:
            return
        base = [self._model_name, stats.connector]
        labels = ["model_name", "connector"]
        nbytes = CounterMetricFamily("pdserve:kv_transfer_bytes", "KV bytes moved by the connector",
                                     labels=labels + ["direction"])
        nblocks = CounterMetricFamily("pdserve:kv_transfer_blocks", "KV blocks moved by the connector",
                                      labels=labels + ["direction"])
        latency = HistogramMetricFamily("pdserve:kv_transfer_latency_seconds",
                                        "Per-request KV save / load latency", labels=labels + ["direction"])
        for d in DIRECTIONS:
            nbytes.add_metric(base + [d], stats.bytes.get(d, 0))
            nblocks.add_metric(base + [d], stats.blocks.get(d, 0))
            counts = stats.latency_buckets.get(d, [0] * (len(LATENCY_BUCKETS) + 1))
            cumulative, running = [], 0
            for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts):
                running += count
                cumulative.append((bound, running))
            latency.add_metric(base + [d], cumulative, stats.latency_sum.get(d, 0.0))
        failures = CounterMetricFamily("pdserve:kv_transfer_failures", "KV loads or saves that failed",
                                       labels=labels + ["reason"])
        for reason, n in sorted(stats.failures.items()):
            failures.add_metric(base + [reason], n)
        held = GaugeMetricFamily("pdserve:kv_transfer_blocks_held", "KV blocks held under lease for a peer",
                                 labels=labels)
        held.add_metric(base, stats.blocks_held)
        yield from (nbytes, nblocks, latency, failures, held)
