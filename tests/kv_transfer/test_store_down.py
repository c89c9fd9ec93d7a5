"""A store that is down, and Redis credentials (issue 11): an optional lookup never fails a request, a promised
load fails with a clear reason that names no URL, passwords come from the environment and never from URLs."""

from __future__ import annotations

import argparse
import subprocess
import time

import pytest

from disagg_helpers import MAX_TOKENS, connector_stats, engine, greedy, monolithic, prefill_all, prompts_of
from disagg_helpers import decode_all, run_all, settle
from pdserve.cli.local_servers import free_port
from pdserve.engine.kv_transfer.options import add_kv_transfer_arguments, kv_transfer_kwargs
from pdserve.engine.kv_transfer.stores.redis_store import RedisStore, check_redis_url
from pdserve.engine.kv_transfer.stores.store import StoreUnavailableError, redact_url
from tests.helpers.tiny_models import make_tiny_model

PROMPTS = prompts_of([21, 40])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-down") / "llama")


def _dead_redis() -> dict:
    return {"redis_url": f"redis://127.0.0.1:{free_port()}/0", "redis_timeout_s": 0.3, "kv_load_timeout_s": 0.3,
            "load_failure_policy": "fail"}


def test_a_request_without_a_handle_is_served_when_the_store_is_down_under_fail(model):
    d = engine(model, "decode", "redis", **_dead_redis())
    for i, p in enumerate(PROMPTS):
        d.add_request(p, greedy(MAX_TOKENS), request_id=f"q{i}")
    out = run_all(d, [f"q{i}" for i in range(len(PROMPTS))])
    assert [out[f"q{i}"].outputs[0].token_ids for i in range(len(PROMPTS))] == monolithic(model, PROMPTS)
    assert connector_stats(d).failures == {"store_unavailable": len(PROMPTS)}  # counted, not fatal
    settle(d)


def test_a_promised_load_from_a_store_that_is_down_fails_clearly_without_the_url(model):
    opts = _dead_redis()
    p, d = engine(model, "prefill", "redis", **opts), engine(model, "decode", "redis", **opts)
    firsts = prefill_all(p, PROMPTS[:1])
    assert firsts["p0"].kv_transfer_params  # the prefill still answers (its saves failed, counted)
    out = decode_all(d, PROMPTS[:1], firsts)["p0"].outputs[0]
    assert out.finish_reason == "abort"
    assert str(out.stop_reason) == "KV transfer failed (store_unavailable): the redis KV store is unavailable"
    settle(p, d)


def test_redact_url_drops_userinfo():
    assert redact_url("redis://user:s3cret@redis.ns:6380/2") == "redis://redis.ns:6380/2"
    assert redact_url("rediss://:s3cret@10.0.0.5/0") == "rediss://10.0.0.5/0"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"


def test_a_redis_url_with_credentials_or_another_scheme_is_refused():
    with pytest.raises(ValueError, match="PDSERVE_REDIS_PASSWORD"):
        check_redis_url("redis://:s3cret@redis:6379/0")
    with pytest.raises(ValueError, match="redis://, rediss:// .TLS. or unix://"):
        check_redis_url("http://redis:6379/0")
    check_redis_url("rediss://redis:6380/0")
    check_redis_url("unix:///run/redis.sock?db=0")
    parser = argparse.ArgumentParser()
    add_kv_transfer_arguments(parser)
    args = parser.parse_args(["--kv-connector", "redis", "--redis-url", "redis://u:pw@r:6379/0"])
    with pytest.raises(ValueError, match="must not carry credentials"):
        kv_transfer_kwargs(args, "decode")
    args = parser.parse_args(["--kv-connector", "redis", "--redis-url", "redis://r:6379/0"])
    kw = kv_transfer_kwargs(args, "decode", environ={"PDSERVE_REDIS_PASSWORD": "pw"})
    assert kw["redis_password"] == "pw" and "pw" not in repr(kw["options"])


def test_the_password_from_the_environment_authenticates_and_errors_never_show_it():
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", "s3cret-pw"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        good = RedisStore(url, "auth", password="s3cret-pw", timeout_s=2.0)
        deadline = time.monotonic() + 10
        while True:
            try:
                good.put("k", b"v")
                break
            except StoreUnavailableError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        assert good.get("k") == b"v"
        for password in (None, "wrong"):
            with pytest.raises(StoreUnavailableError) as err:
                RedisStore(url, "auth", password=password, timeout_s=2.0).get("k")
            assert "s3cret" not in str(err.value) and str(port) not in str(err.value)
    finally:
        proc.terminate()
        proc.wait(10)
