"""Faults between a prefill and a decode engine: every one ends in the monolithic engine's tokens under the
``recompute`` policy (or a clear error under ``fail``), with no block left in use on either side. Plus decode-side
prefix reuse: a prompt whose prefix the decode engine already holds loads only the blocks it lacks."""

from __future__ import annotations

import os

import pytest

from disagg_helpers import (MAX_TOKENS, connector_stats, decode_all, disagg, engine, monolithic,
                            options_for, prefill_all, prompts_of, settle)
from pdserve.cli.local_servers import free_port
from pdserve.engine.kv_transfer.stores.store import block_key
from tests.helpers.tiny_models import make_tiny_model

PROMPTS = prompts_of([21, 40, 9])  # 2, 3 and 1 blocks of 16, each ending in a partial block


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-faults") / "llama")


def continued(model, prompts, firsts):
    """What the monolithic engine makes of each prompt followed by the prefill's first token."""
    extended = [p + firsts[f"p{i}"].outputs[0].token_ids for i, p in enumerate(prompts)]
    return [firsts[f"p{i}"].outputs[0].token_ids + rest
            for i, rest in enumerate(monolithic(model, extended, MAX_TOKENS - 1))]


def tokens(firsts, rest, n):
    return [firsts[f"p{i}"].outputs[0].token_ids + rest[f"p{i}"].outputs[0].token_ids for i in range(n)]


ASYNC = pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])


@ASYNC
def test_prefill_gone_before_decode_loaded(model, tmp_path, redis_url, asynchronous):
    """grpc: the prefill engine's KV server dies after it answered; the decode engine recomputes."""
    opts = options_for("grpc", tmp_path, redis_url)
    p = engine(model, "prefill", "grpc", asynchronous=asynchronous, **opts)
    d = engine(model, "decode", "grpc", asynchronous=asynchronous, **opts)
    firsts = prefill_all(p, PROMPTS)
    p.core.shutdown()  # the pod is gone: its KV server stops answering
    rest = decode_all(d, PROMPTS, firsts)
    assert tokens(firsts, rest, len(PROMPTS)) == monolithic(model, PROMPTS)
    assert connector_stats(d).failures == {"peer_gone": len(PROMPTS)}
    settle(d)


def _saved_files(opts):
    root = opts["kv_path"]
    return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs if f.endswith(".kv"))


@ASYNC
@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_missing_or_corrupt_block_is_recomputed(fault, model, tmp_path, redis_url, asynchronous):
    opts = options_for("shared-fs", tmp_path, redis_url, kv_load_timeout_s=0.3)
    p = engine(model, "prefill", "shared-fs", asynchronous=asynchronous, **opts)
    d = engine(model, "decode", "shared-fs", asynchronous=asynchronous, **opts)
    firsts = prefill_all(p, PROMPTS)
    settle(p)  # every save written
    victim = p.core.scheduler.kv_connector.store.path_of(
        block_key(int(firsts["p1"].kv_transfer_params["block_hashes"][1], 16)))
    if fault == "missing":
        os.unlink(victim)
    else:
        with open(victim, "r+b") as f:
            f.seek(-7, os.SEEK_END)
            byte = f.read(1)
            f.seek(-7, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    rest = decode_all(d, PROMPTS, firsts)
    assert tokens(firsts, rest, len(PROMPTS)) == monolithic(model, PROMPTS)
    assert connector_stats(d).failures == {"missing" if fault == "missing" else "checksum": 1}
    settle(p, d)


@pytest.mark.parametrize("change", [{"block_size": 32}, {"kv_cache_dtype": "fp8_e4m3"}])
@pytest.mark.parametrize("connector", ["shared-fs", "grpc"])
def test_incompatible_peer_is_recomputed(change, connector, model, tmp_path, redis_url):
    """The prefill engine runs another block size or KV dtype: its handle is refused, the decode computes."""
    opts = options_for(connector, tmp_path, redis_url)
    p = engine(model, "prefill", connector, config_overrides=change, **opts)
    d = engine(model, "decode", connector, **opts)
    firsts = prefill_all(p, PROMPTS)
    rest = decode_all(d, PROMPTS, firsts)
    assert tokens(firsts, rest, len(PROMPTS)) == continued(model, PROMPTS, firsts)
    assert connector_stats(d).failures == {"incompatible": len(PROMPTS)}
    d.core.shutdown()  # grpc: nobody will pull; the prefill's leases run out (covered below)
    settle(d)


def test_redis_down_on_both_sides(model, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    opts = {"redis_url": dead, "redis_timeout_s": 0.3, "kv_load_timeout_s": 0.3}
    p, d = engine(model, "prefill", "redis", **opts), engine(model, "decode", "redis", **opts)
    assert disagg(p, d, PROMPTS) == monolithic(model, PROMPTS)
    assert connector_stats(d).failures.get("store_unavailable", 0) >= len(PROMPTS)
    assert connector_stats(p).failures.get("store_unavailable", 0) >= 1
    settle(p, d)


def test_lease_expires_then_decode_recomputes(model, tmp_path, redis_url):
    opts = options_for("grpc", tmp_path, redis_url, kv_lease_s=0.2)
    p, d = engine(model, "prefill", "grpc", **opts), engine(model, "decode", "grpc", **opts)
    firsts = prefill_all(p, PROMPTS)
    assert p.core.scheduler.kv_cache_manager.usage > 0  # held for the decode engine
    settle(p)  # the leases run out: every block is free again
    assert connector_stats(p).failures == {"lease_expired": len(PROMPTS)}
    rest = decode_all(d, PROMPTS, firsts)
    assert tokens(firsts, rest, len(PROMPTS)) == monolithic(model, PROMPTS)
    assert connector_stats(d).failures == {"lease_expired": len(PROMPTS)}
    settle(d)


@ASYNC
@pytest.mark.parametrize("connector", ["shared-fs", "grpc"])
def test_fail_policy_ends_the_request_with_a_clear_error(connector, model, tmp_path, redis_url, asynchronous):
    opts = options_for(connector, tmp_path, redis_url, kv_load_timeout_s=0.3)
    p = engine(model, "prefill", connector, **opts)
    d = engine(model, "decode", connector, asynchronous=asynchronous, **{**opts, "load_failure_policy": "fail"})
    firsts = prefill_all(p, PROMPTS[:1])
    settle(p) if connector == "shared-fs" else p.core.shutdown()
    if connector == "shared-fs":
        for path in _saved_files(opts):
            os.unlink(path)
    rest = decode_all(d, PROMPTS[:1], firsts)
    out = rest["p0"].outputs[0]
    assert out.finish_reason == "abort" and out.token_ids == []
    reason = "missing" if connector == "shared-fs" else "peer_gone"
    assert f"KV transfer failed ({reason})" in str(out.stop_reason)
    settle(d)


@pytest.mark.parametrize("connector", ["shared-fs", "grpc"])
def test_decode_reuses_its_own_prefix_and_loads_only_missing_blocks(connector, model, tmp_path, redis_url):
    opts = options_for(connector, tmp_path, redis_url)
    p, d = engine(model, "prefill", connector, **opts), engine(model, "decode", connector, **opts)
    shared = prompts_of([48], seed=7)[0]  # three full blocks
    first = [shared + prompts_of([10], seed=1)[0]]
    second = [shared + prompts_of([25], seed=2)[0]]  # same three blocks, then 25 new tokens (2 blocks)
    assert disagg(p, d, first, tag="a") == monolithic(model, first)
    loaded_before = connector_stats(d).blocks["load"]
    assert disagg(p, d, second, tag="b") == monolithic(model, second)
    assert connector_stats(d).blocks["load"] - loaded_before == 2  # only the blocks after the shared prefix
    settle(p, d)
