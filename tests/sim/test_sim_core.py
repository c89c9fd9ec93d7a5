"""The simulated engine core: exact step times from the cost model, the real scheduler's paging, preemption and
KV-load paths, and injected KV faults."""

from __future__ import annotations

import json

import pytest
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_core import EngineCoreRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.sim.clock import VirtualClock
from pdserve.sim.core import SimEngineCore
from pdserve.sim.cost_model import CostProfile, available_profiles, load_profile
from pdserve.sim.kv import KVFaults

PROFILE = CostProfile(name="t", model="m", gpu="g", base_ms=5.0, per_token_ms=0.1, per_context_ms=0.001,
                      kv_bytes_per_token=1000, num_blocks=1000, block_size=16)


def _config(role: str = "both", **kw) -> EngineConfig:
    kw.setdefault("max_num_batched_tokens", 256)
    return EngineConfig.create("smollm2-135m-instruct", role=role, **kw)


def _core(role: str = "both", faults: KVFaults | None = None, policy: str = "recompute", **kw) -> SimEngineCore:
    return SimEngineCore(_config(role, **kw), PROFILE, clock=VirtualClock(), faults=faults, pod=f"{role}-0",
                         load_failure_policy=policy)


def _run(core: SimEngineCore, limit: int = 10_000) -> dict:
    """Step until idle; returns request id -> (token ids, finish reason, kv handle, stop/abort reason)."""
    out: dict = {}
    for _ in range(limit):
        if not core.has_unfinished_requests():
            return out
        for o in core.step():
            toks, _, _, _ = out.get(o.request_id, ([], None, None, None))
            out[o.request_id] = (toks + o.new_token_ids, o.finish_reason, o.kv_transfer_params, o.stop_reason)
    raise AssertionError("the core did not finish")


def _req(rid: str, n_prompt: int, max_tokens: int, handle: dict | None = None, base: int = 7) -> EngineCoreRequest:
    return EngineCoreRequest(rid, [base + i % 50 for i in range(n_prompt)],
                             SamplingParams(max_tokens=max_tokens, temperature=0.0), kv_transfer_params=handle)


def test_step_time_is_the_fitted_linear_model():
    assert PROFILE.step_time_s(0, 0) == 0.0
    assert PROFILE.step_time_s(100, 1000) == pytest.approx((5.0 + 10.0 + 1.0) / 1e3)


def test_shipped_profiles_load_and_unknown_ones_are_refused(tmp_path):
    assert {"llama-3.1-8b_h100", "llama-3.1-8b_h200"} <= set(available_profiles())
    h100 = load_profile("llama-3.1-8b_h100")
    # The three figures it was fitted from (docs/performance.md), within 2 %.
    assert h100.step_time_s(1, 256) == pytest.approx(1 / 166.2, rel=0.02)
    assert h100.step_time_s(64, 64 * 1024) == pytest.approx(9.57e-3, rel=0.02)
    # Steps with a prompt chunk run eagerly on the GPU: a 128-token prefill measured 17.4 ms, a 4k one ~105 ms.
    assert h100.step_time_s(128, 128, has_prefill=True) == pytest.approx(17.4e-3, rel=0.05)
    assert h100.step_time_s(4096, 4096, has_prefill=True) == pytest.approx(105e-3, rel=0.02)
    with pytest.raises(ValueError, match="unknown cost profile"):
        load_profile("no-such-gpu")
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({**h100.__dict__, "flops": 1}))
    with pytest.raises(ValueError, match="unknown fields"):
        load_profile(str(bad))
    bad.write_text(json.dumps({**h100.__dict__, "num_blocks": 0}))
    with pytest.raises(ValueError, match="num_blocks must be a positive integer"):
        load_profile(str(bad))


def test_a_request_takes_one_prefill_step_then_one_decode_step_per_token():
    core = _core()
    core.add_request(_req("a", 100, 5))
    out = _run(core)
    assert out["a"][1] == "length" and len(out["a"][0]) == 5
    # prefill: 100 tokens attending 100; then 4 decodes attending 101..104 (the 5th token needs no step)
    expected = PROFILE.step_time_s(100, 100) + sum(PROFILE.step_time_s(1, c) for c in range(101, 105))
    assert core.clock.now() == pytest.approx(expected)
    assert core.num_steps == 5


def test_prefix_cache_hits_cost_nothing():
    core = _core()
    core.add_request(_req("a", 64, 1))
    _run(core)
    t0 = core.clock.now()
    core.add_request(_req("b", 64, 1))
    _run(core)
    # 48 of 64 tokens hit (full blocks, the last token is always computed): one 16-token step
    assert core.clock.now() - t0 == pytest.approx(PROFILE.step_time_s(16, 64))


def test_memory_pressure_preempts_and_every_request_still_finishes():
    core = _core(num_blocks=12)  # 192 tokens of KV for 4 requests of up to 96
    for i in range(4):
        core.add_request(_req(f"r{i}", 32, 64, base=i * 100))
    out = _run(core)
    assert all(out[f"r{i}"][1] == "length" and len(out[f"r{i}"][0]) == 64 for i in range(4))
    assert core.get_stats().num_preemptions > 0


def test_prefill_handle_lets_decode_load_instead_of_computing():
    prefill, decode = _core("prefill"), _core("decode")
    prefill.add_request(_req("p", 200, 1))
    handle = _run(prefill)["p"][2]
    assert (handle["connector"], handle["engine_id"], handle["transfer_id"], handle["num_tokens"]) == \
        ("sim", "prefill-0", "p", 200)
    assert len(handle["block_hashes"]) == 200 // 16
    decode.add_request(_req("d", 200, 3, handle))
    out = _run(decode)
    assert out["d"][1] == "length"
    # 199 tokens loaded (200 KB at 63.4 GB/s), the last prompt token computed, then 2 decodes
    assert decode.num_computed_tokens_total == 1 + 2
    assert decode.kv_state.counters == {"loads": 1, "loaded": 1, "failed": 0}


@pytest.mark.parametrize("fault", [KVFaults(fail_rate=1.0), KVFaults(corrupt_rate=1.0)])
def test_failed_or_corrupted_load_is_recomputed_locally(fault):
    decode = _core("decode", faults=fault)
    handle = {"connector": "sim", "engine_id": "prefill-0", "transfer_id": "p", "num_tokens": 200}
    decode.add_request(_req("d", 200, 3, handle))
    out = _run(decode)
    assert out["d"][1] == "length" and len(out["d"][0]) == 3
    assert decode.num_computed_tokens_total == 200 + 2
    assert decode.kv_state.counters["failed"] == 1


def test_failed_load_under_fail_policy_ends_the_request_with_a_clear_error():
    decode = _core("decode", faults=KVFaults(fail_rate=1.0), policy="fail")
    handle = {"connector": "sim", "engine_id": "p0", "transfer_id": "p", "num_tokens": 200}
    decode.add_request(_req("d", 200, 3, handle))
    out = _run(decode)
    assert out["d"][1] == "abort" and out["d"][0] == []
    assert "KV transfer failed (transfer_failed)" in out["d"][3]


def test_slow_connector_delays_the_load_by_latency_and_bandwidth():
    fast = _core("decode")
    slow = _core("decode", faults=KVFaults(latency_s=0.5, bandwidth_gbps=0.001))
    for core in (fast, slow):
        core.add_request(_req("d", 200, 2, {"connector": "sim", "engine_id": "p", "transfer_id": "p",
                                            "num_tokens": 200}))
        _run(core)
    # 199 tokens x 1000 B at 1 MB/s = 0.199 s, plus 0.5 s; the idle waits land on the load's finishing time
    assert slow.clock.now() - fast.clock.now() == pytest.approx(0.5 + 0.199, abs=0.025)


def test_load_from_a_killed_prefill_pod_fails_as_peer_gone():
    decode = _core("decode", policy="fail")
    decode.kv_state.dead_sources.add("p0")
    decode.add_request(_req("d", 50, 2, {"connector": "sim", "engine_id": "p0", "transfer_id": "p", "num_tokens": 50}))
    assert "peer_gone" in _run(decode)["d"][3]


def test_a_foreign_connector_is_refused():
    with pytest.raises(ValueError, match="'sim' connector"):
        SimEngineCore(_config("decode", connector="grpc"), PROFILE)
