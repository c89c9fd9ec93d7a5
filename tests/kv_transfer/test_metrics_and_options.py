"""The connector metrics as Prometheus renders them, and the CLI flags as engine config."""

from __future__ import annotations

import argparse

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine.kv_transfer.metrics import KVTransferCollector, KVTransferStats
from pdserve.engine.kv_transfer.options import add_kv_transfer_arguments, kv_transfer_kwargs
from pdserve.engine.kv_transfer.registry import resolve_factory


def test_collector_exports_every_family_with_cumulative_buckets():
    stats = KVTransferStats(connector="redis")
    stats.record_transfer("load", 3, 3000, 0.004)
    stats.record_transfer("load", 1, 1000, 0.2)
    stats.record_transfer("save", 2, 2000, None)
    stats.record_failure("checksum")
    stats.set_blocks_held(5)
    snapshot = KVTransferStats.from_dict(stats.to_dict())  # as it travels from the engine-core process
    registry = CollectorRegistry()
    registry.register(KVTransferCollector(lambda: snapshot, "m"))
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for fam in text_string_to_metric_families(generate_latest(registry).decode()) for x in fam.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted({"model_name": "m", "connector": "redis", **labels}.items())))]

    assert value("pdserve:kv_transfer_bytes_total", direction="load") == 4000
    assert value("pdserve:kv_transfer_blocks_total", direction="save") == 2
    assert value("pdserve:kv_transfer_latency_seconds_bucket", direction="load", le="0.005") == 1
    assert value("pdserve:kv_transfer_latency_seconds_bucket", direction="load", le="+Inf") == 2
    assert value("pdserve:kv_transfer_latency_seconds_count", direction="load") == 2
    assert value("pdserve:kv_transfer_failures_total", reason="checksum") == 1
    assert value("pdserve:kv_transfer_blocks_held") == 5


def test_collector_is_silent_without_a_connector():
    registry = CollectorRegistry()
    registry.register(KVTransferCollector(lambda: None, "m"))
    assert b"kv_transfer" not in generate_latest(registry)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_kv_transfer_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_become_a_frozen_kv_transfer_config():
    kw = kv_transfer_kwargs(_args("--kv-connector", "redis", "--redis-url", "redis://r:6379/0",
                                  "--kv-load-failure-policy", "fail"), "decode")
    assert kw["role"] == "decode" and kw["connector"] == "redis"
    opts = dict(kw["options"])
    assert opts["redis_url"] == "redis://r:6379/0" and opts["load_failure_policy"] == "fail"
    assert list(kw["options"]) == sorted(kw["options"])  # hashable and order-independent


@pytest.mark.parametrize("argv,message", [(["--kv-connector", "shared-fs"], "--kv-path"),
                                          (["--kv-connector", "redis"], "--redis-url")])
def test_missing_connector_options_are_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        kv_transfer_kwargs(_args(*argv), "prefill")


def test_unknown_connector_names_the_built_in_ones():
    with pytest.raises(ValueError, match="shared-fs, redis, grpc"):
        resolve_factory("nixl")
    with pytest.raises(ValueError, match="cannot load"):
        resolve_factory("no.such.module:factory")
