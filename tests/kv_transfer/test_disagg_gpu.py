"""On a GPU (CUDA graphs on): prefill -> connector -> decode equals the monolithic engine, for every connector.

Decode steps replay CUDA graphs, which run no per-layer hooks: this checks that the connector path and the graph
path agree (and that the device-to-host staging and host-to-device loads are right).
"""

from __future__ import annotations

import dataclasses

import pytest

from disagg_helpers import greedy, prompts_of, run_all
from pdserve.engine.config import EngineConfig, KVTransferConfig
from pdserve.engine.llm_engine import LLMEngine
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = make_tiny_model("llama", tmp_path_factory.mktemp("gpu") / "llama")
    return EngineConfig.create(model, device="cuda", num_blocks=256, block_size=16, max_model_len=512,
                               max_num_batched_tokens=512, gpu_memory_utilization=0.3)


@pytest.mark.parametrize("connector", ["shared-fs", "redis", "grpc"])
def test_disaggregated_equals_monolithic_on_gpu(connector, base, tmp_path, request):
    # Only the redis case needs a server (GPU machines may have none installed).
    redis_url = request.getfixturevalue("redis_url") if connector == "redis" else None
    prompts = prompts_of([5, 16, 17, 40, 100, 33], vocab=400)
    ids = [f"r{i}" for i in range(len(prompts))]
    mono = LLMEngine(base)
    assert mono.core.runner.graph_runner is not None
    for rid, p in zip(ids, prompts):
        mono.add_request(p, greedy(8), request_id=rid)
    ref = run_all(mono, ids)
    opts = {"kv_path": str(tmp_path / "kv")}
    if redis_url:
        opts["redis_url"] = redis_url
    opts = tuple(sorted(opts.items()))
    p, d = (LLMEngine(dataclasses.replace(base, kv_transfer=KVTransferConfig(role, connector, opts)))
            for role in ("prefill", "decode"))
    for rid, prompt in zip(ids, prompts):
        p.add_request(prompt, greedy(1), request_id=rid)
    firsts = run_all(p, ids)
    for rid, prompt in zip(ids, prompts):
        t0 = firsts[rid].outputs[0].token_ids
        d.add_request(prompt + t0, greedy(7), request_id=rid, kv_transfer_params=firsts[rid].kv_transfer_params)
    rest = run_all(d, ids)
    for rid in ids:
        assert firsts[rid].outputs[0].token_ids + rest[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    assert d.core.num_computed_tokens_total == len(prompts) * 7
    for eng in (p, d):
        for _ in range(500):
            if not eng.has_unfinished_requests():
                break
            eng.step()
        assert eng.core.scheduler.kv_cache_manager.usage == 0.0
        eng.core.shutdown()
