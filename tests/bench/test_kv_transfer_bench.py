"""``pdserve bench kv-transfer`` on CPU: both processes, real connectors, checksummed caches."""

from __future__ import annotations

import pytest

from pdserve.bench.kv_transfer import bench_connector


@pytest.mark.parametrize("connector", ["grpc", "shared-fs"])
def test_kv_transfer_bench_moves_blocks_between_processes(connector, tmp_path):
    # The bench compares digests of the sending and receiving caches: a transfer that never registered (the grpc
    # KV server answers NOT_FOUND) or copied the wrong bytes raises instead of reporting a time.
    options = {"kv_path": str(tmp_path)} if connector == "shared-fs" else {}
    rows = bench_connector(connector, options, "smollm2-135m", "float32", 16, "cpu", [40], 1)
    assert [r["prompt_len"] for r in rows] == [40] and rows[0]["load_ms"] > 0
