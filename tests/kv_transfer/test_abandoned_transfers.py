"""A decode request that ends before it pulls its KV (client gone, aborted while waiting, prompt already cached
on the decode pod) releases the transfer at once: the prefill pod's blocks are not held until the lease ends."""

from __future__ import annotations

import time

import pytest

from disagg_helpers import MAX_TOKENS, connector_stats, engine, greedy, options_for, prefill_all, prompts_of, settle
from tests.helpers.tiny_models import make_tiny_model

PROMPTS = prompts_of([21, 40])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-abandoned") / "llama")


def _step_until(eng, cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        if eng.has_unfinished_requests():
            eng.step()
        else:
            time.sleep(0.01)


def test_a_decode_request_aborted_before_its_pull_releases_the_prefill_blocks(model, tmp_path, redis_url):
    opts = options_for("grpc", tmp_path, redis_url, kv_lease_s=60.0)  # the lease alone would hold them a minute
    p, d = engine(model, "prefill", "grpc", **opts), engine(model, "decode", "grpc", **opts)
    firsts = prefill_all(p, PROMPTS)
    manager = p.core.scheduler.kv_cache_manager
    assert manager.usage > 0 and connector_stats(p).blocks_held > 0
    for i, prompt in enumerate(PROMPTS):
        first = firsts[f"p{i}"]
        d.add_request(prompt + first.outputs[0].token_ids, greedy(MAX_TOKENS - 1), request_id=f"p{i}",
                      kv_transfer_params=first.kv_transfer_params)
    d.abort_request_ids([f"p{i}" for i in range(len(PROMPTS))])  # the client went away before any step
    _step_until(d, lambda: not d.has_unfinished_requests())
    _step_until(p, lambda: manager.usage == 0.0)  # released well before the 60 s lease
    assert connector_stats(p).blocks_held == 0
    assert "lease_expired" not in connector_stats(p).failures
    settle(p, d)


def test_a_forged_handle_of_an_aborted_request_is_not_dialled_either(model, tmp_path, redis_url):
    opts = options_for("grpc", tmp_path, redis_url, kv_lease_s=60.0)
    p, d = engine(model, "prefill", "grpc", **opts), engine(model, "decode", "grpc", **opts)
    firsts = prefill_all(p, PROMPTS[:1])
    forged = {**firsts["p0"].kv_transfer_params, "mac": "00" * 32}
    d.add_request(PROMPTS[0] + firsts["p0"].outputs[0].token_ids, greedy(2), request_id="x",
                  kv_transfer_params=forged)
    d.abort_request_ids(["x"])
    _step_until(d, lambda: not d.has_unfinished_requests())
    for _ in range(20):
        p.step()
    assert p.core.scheduler.kv_cache_manager.usage > 0  # an unverified handle released nothing
    assert len(p.core.kv_connector.registry) == 1  # the worker half's
