"""Issue 11: an id whose request finished but whose blocks are still held for a KV peer is not free.

Before, a new request reusing such an id took over the held request's block table: it wrote its KV into blocks
that the prefix cache maps to another prompt. The core now refuses every id it knows in any state.
"""

from __future__ import annotations

import pytest

from disagg_helpers import engine, greedy, options_for, run_all
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.timeout(300)


def test_reusing_the_id_of_a_held_request_is_refused(tmp_path, redis_url) -> None:
    model = make_tiny_model("llama", tmp_path / "m")
    prefill = engine(model, "prefill", "grpc", **options_for("grpc", tmp_path, redis_url))
    try:
        prefill.add_request(list(range(3, 40)), greedy(1), request_id="r1")
        first = run_all(prefill, ["r1"])["r1"]
        assert first.kv_transfer_params is not None
        assert prefill.core.scheduler.has_request_id("r1")  # finished, blocks held for the decode pod
        used = prefill.core.get_stats().num_total_blocks - prefill.core.get_stats().num_free_blocks
        with pytest.raises(ValueError, match="already in use"):
            prefill.add_request(list(range(50, 90)), greedy(1), request_id="r1")
        stats = prefill.core.get_stats()
        assert stats.num_total_blocks - stats.num_free_blocks == used and stats.num_waiting == 0
    finally:
        prefill.core.shutdown()
