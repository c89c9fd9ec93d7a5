"""Asynchronous scheduling on prefill and decode engines: the connector's scheduler half follows the steps one
behind, as sampling does. The careful cases, each under synchronous and asynchronous scheduling (forced: CPU
defaults to off): an abort while a load is pending (and another request's step is in flight), a preempted decode
request (it recomputes instead of pulling a spent transfer again), a prefill aborted while the save of its step is
in flight, and the ordering of a finished prefill's handover. Every block ends free on both sides."""

from __future__ import annotations

import re
import threading
import time

import pytest

from disagg_helpers import (MAX_TOKENS, connector_stats, disagg, engine, greedy, monolithic, options_for,
                            prefill_all, prompts_of, run_all, settle)
from tests.helpers.tiny_models import make_tiny_model

ASYNC = pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
PROMPTS = prompts_of([21, 40], seed=3)
LONG = 12  # tokens of a request that must still be decoding while others come and go


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-async") / "llama")


def _gate(obj, method: str) -> threading.Event:
    """Make ``obj.method`` block until the returned event is set (a slow store, deterministically)."""
    gate, real = threading.Event(), getattr(obj, method)

    def gated(*args, **kwargs):
        assert gate.wait(30), "gate never opened"
        return real(*args, **kwargs)

    setattr(obj, method, gated)
    return gate


def _step_until(eng, cond, outputs: dict, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        for out in eng.step():
            outputs.setdefault(out.request_id, []).append(out)


@ASYNC
def test_abort_while_a_load_is_pending(model, tmp_path, redis_url, asynchronous):
    opts = options_for("shared-fs", tmp_path, redis_url)
    p = engine(model, "prefill", "shared-fs", **opts)
    d = engine(model, "decode", "shared-fs", asynchronous=asynchronous, **opts)
    firsts = prefill_all(p, PROMPTS)
    settle(p)  # every save written
    outs: dict = {}
    first0, first1 = firsts["p0"], firsts["p1"]
    d.add_request(PROMPTS[0] + first0.outputs[0].token_ids, greedy(LONG - 1), request_id="p0",
                  kv_transfer_params=first0.kv_transfer_params)
    scheduler = d.core.scheduler
    _step_until(d, lambda: scheduler.num_running == 1, outs)  # p0 loaded and decoding
    gate = _gate(d.core.kv_connector.store, "get_many")
    d.add_request(PROMPTS[1] + first1.outputs[0].token_ids, greedy(MAX_TOKENS - 1), request_id="p1",
                  kv_transfer_params=first1.kv_transfer_params)
    _step_until(d, lambda: scheduler.num_loading == 1, outs)
    assert scheduler.num_running == 1
    if asynchronous:
        assert d.core._in_flight is not None  # p0's step runs while p1 is aborted
    d.abort_request_ids(["p1"])
    held = connector_stats(d).blocks_held
    assert held == 3  # p1's blocks (40 tokens + 1): the load may still write them
    _step_until(d, lambda: any(o.finished for o in outs.get("p0", [])), outs)
    assert connector_stats(d).blocks_held == held  # still loading: still held
    gate.set()
    settle(d)  # the load ends, the hold is released, every block is free
    assert connector_stats(d).blocks_held == 0
    tokens = first0.outputs[0].token_ids + outs["p0"][-1].outputs[0].token_ids
    assert tokens == monolithic(model, PROMPTS[:1], LONG)[0]
    assert "p1" not in outs


@ASYNC
def test_a_preempted_decode_request_recomputes_instead_of_pulling_again(model, tmp_path, redis_url, asynchronous):
    """Three loaded requests outgrow a 10-block pool, so the newest is preempted. Its transfer is spent (the
    prefill pod freed it on release): it recomputes from the decode pod's own prefix cache, and the ``fail``
    policy proves no second pull is tried (it would end the request). 41 tokens load as 3 blocks each; with 40
    more, any two requests decoding at once need 12 blocks, so the preemption does not hang on the loads landing
    together (with 16 more, one request could finish before the last load landed, and none was preempted)."""
    prompts, max_tokens = prompts_of([40, 40, 40], seed=5), 40
    opts = options_for("grpc", tmp_path, redis_url, load_failure_policy="fail")
    p = engine(model, "prefill", "grpc", asynchronous=asynchronous, **opts)
    d = engine(model, "decode", "grpc", config_overrides={"num_blocks": 10}, asynchronous=asynchronous, **opts)
    assert disagg(p, d, prompts, max_tokens=max_tokens) == monolithic(model, prompts, max_tokens)
    assert d.core.get_stats().num_preemptions > 0
    assert connector_stats(d).failures == {}
    assert connector_stats(d).blocks["load"] == 3 * 3  # each transfer pulled once
    settle(p, d)


@ASYNC
def test_a_prefill_aborted_mid_save_keeps_its_blocks_until_the_save_is_written(model, tmp_path, redis_url,
                                                                                 asynchronous):
    """A chunked prefill (16-token budget) is aborted after its first chunk was scheduled; that chunk's save
    (gated here) still reads the blocks, so they are held until it is written, then freed."""
    opts = options_for("shared-fs", tmp_path, redis_url)
    p = engine(model, "prefill", "shared-fs", config_overrides={"max_num_batched_tokens": 16},
               asynchronous=asynchronous, **opts)
    gate = _gate(p.core.kv_connector.store, "put")
    p.add_request(PROMPTS[1], greedy(1), request_id="a")
    p.step()  # the first chunk: one full block to save
    p.abort_request_ids(["a"])
    if asynchronous:
        assert p.core._in_flight is not None  # the chunk's step is not even applied yet
    assert connector_stats(p).blocks_held > 0
    manager = p.core.scheduler.kv_cache_manager
    for _ in range(5):
        p.step()
    assert manager.usage > 0  # the save has not been written
    gate.set()
    settle(p)


def test_a_finished_prefill_is_handed_over_only_after_its_step_is_applied(model, tmp_path, redis_url):
    """grpc, asynchronous: the call that launches the prefill's step returns nothing; the next one waits for it
    and returns the first token with the handle; the KV server serves the blocks from the step after."""
    opts = options_for("grpc", tmp_path, redis_url)
    p = engine(model, "prefill", "grpc", asynchronous=True, **opts)
    registry = p.core.kv_connector.registry
    p.add_request(PROMPTS[0], greedy(1), request_id="x")
    assert p.step() == []  # launched, in flight
    assert len(registry) == 0 and p.core.scheduler.get_request("x") is not None
    (out,) = p.step()  # applied: the token and the handle
    assert out.finished and out.kv_transfer_params is not None
    assert len(registry) == 0  # handed to the worker with the next step's metadata
    p.step()
    assert len(registry) == 1
    d = engine(model, "decode", "grpc", asynchronous=True, **opts)
    d.add_request(PROMPTS[0] + out.outputs[0].token_ids, greedy(MAX_TOKENS - 1), request_id="x",
                  kv_transfer_params=out.kv_transfer_params)
    rest: dict = {}
    _step_until(d, lambda: any(o.finished for o in rest.get("x", [])), rest)
    assert out.outputs[0].token_ids + rest["x"][-1].outputs[0].token_ids == monolithic(model, PROMPTS[:1])[0]
    assert d.core.num_computed_tokens_total == MAX_TOKENS - 1  # nothing of the prompt was computed
    settle(p, d)


def test_a_constrained_request_keeps_the_decode_pod_synchronous(tmp_path, redis_url):
    """Structured output forces synchronous steps (the bitmask follows every token) on an asynchronous decode pod
    too, while an unconstrained request decodes beside it; both give the monolithic engine's tokens."""
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.structured_output.params import StructuredOutputsParams

    model, regex = "smollm2-135m-instruct", r"[A-Z][a-z]{2,6}"
    opts = options_for("grpc", tmp_path, redis_url)
    p = engine(model, "prefill", "grpc", asynchronous=True, **opts)
    d = engine(model, "decode", "grpc", asynchronous=True, **opts)
    prompts = [p.tokenizer(t).input_ids for t in ("Name a large city in Europe:", "The capital of France is")]

    def params(n, prefix=None):
        constraint = None if prefix is None else StructuredOutputsParams(regex=regex, num_prefix_tokens=prefix)
        return SamplingParams(max_tokens=n, temperature=0.0, structured_outputs=constraint)

    mono = engine(model)
    for rid, prompt, prefix in (("c", prompts[0], 0), ("u", prompts[1], None)):
        mono.add_request(prompt, params(8, prefix), request_id=rid)
    want = {rid: out.outputs[0].token_ids for rid, out in run_all(mono, ["c", "u"]).items()}
    for rid, prompt, prefix in (("c", prompts[0], 0), ("u", prompts[1], None)):
        p.add_request(prompt, params(1, prefix), request_id=rid)
    firsts = run_all(p, ["c", "u"])
    p.step()  # the grpc worker registers the finished transfers
    for rid, prompt, prefix in (("c", prompts[0], 1), ("u", prompts[1], None)):
        first = firsts[rid]
        d.add_request(prompt + first.outputs[0].token_ids, params(7, prefix), request_id=rid,
                      kv_transfer_params=first.kv_transfer_params)
    outs: dict = {}
    while len([o for v in outs.values() for o in v if o.finished]) < 2:
        constrained_running = d.core.scheduler.get_request("c") is not None
        for out in d.step():
            outs.setdefault(out.request_id, []).append(out)
        if constrained_running:
            assert d.core._in_flight is None  # the step ran synchronously
    got = {rid: firsts[rid].outputs[0].token_ids + v[-1].outputs[0].token_ids for rid, v in outs.items()}
    assert got == want
    assert re.fullmatch(regex, p.tokenizer.decode(got["c"], skip_special_tokens=True).strip())
    settle(p, d)
