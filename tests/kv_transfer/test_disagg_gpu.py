"""On a GPU (CUDA graphs on): prefill -> connector -> decode equals the monolithic engine, for every connector.

Decode steps replay CUDA graphs, which run no per-layer hooks: this checks that the connector path and the graph
path agree (and that the device-to-host staging and host-to-device loads are right). The pods run with
asynchronous scheduling (``auto``: on for CUDA) and synchronously.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import shutil

import pytest

from disagg_helpers import greedy, prefill_server_process, prompts_of, run_all
from pdserve.engine.config import EngineConfig, KVTransferConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.security import load_cluster_secret
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu
SECRET = load_cluster_secret()  # tests/conftest.py sets one; the grpc and store connectors need it


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = make_tiny_model("llama", tmp_path_factory.mktemp("gpu") / "llama")
    return EngineConfig.create(model, device="cuda", num_blocks=256, block_size=16, max_model_len=512,
                               max_num_batched_tokens=512, gpu_memory_utilization=0.3)


PROMPTS = prompts_of([5, 16, 17, 40, 100, 33], vocab=400)
IDS = [f"r{i}" for i in range(len(PROMPTS))]


def monolithic(config: EngineConfig, graphs: bool = False) -> dict:
    """The reference: each prompt's 8 greedy tokens from one engine (shut down after); ``graphs``: check that
    its decode steps replay CUDA graphs."""
    mono = LLMEngine(config)
    assert not graphs or mono.core.runner.graph_runner is not None
    for rid, p in zip(IDS, PROMPTS):
        mono.add_request(p, greedy(8), request_id=rid)
    ref = run_all(mono, IDS)
    mono.core.shutdown()
    return ref


def pair(prefill: EngineConfig, decode: EngineConfig, connector: str, opts: tuple) -> tuple[LLMEngine, LLMEngine]:
    """A prefill engine and a decode engine joined by ``connector``."""
    return tuple(LLMEngine(dataclasses.replace(config, kv_transfer=KVTransferConfig(
        role, connector, opts, cluster_secret=SECRET))) for role, config in (("prefill", prefill), ("decode", decode)))


def hand_over(p: LLMEngine, d: LLMEngine, ref: dict, label: str = "", check=None) -> None:
    """Prefill (one token) on ``p``, the other 7 on ``d`` after the KV handover: the tokens equal ``ref``, the
    decode side recomputed nothing (then ``check(d)``, if given), and both sides end with every block free
    (shut down after)."""
    try:
        for rid, prompt in zip(IDS, PROMPTS):
            p.add_request(prompt, greedy(1), request_id=rid)
        firsts = run_all(p, IDS)
        if p.has_unfinished_requests():
            p.step()  # as a pod's engine loop does next: the grpc worker registers the finished transfers
        for rid, prompt in zip(IDS, PROMPTS):
            d.add_request(prompt + firsts[rid].outputs[0].token_ids, greedy(7), request_id=rid,
                          kv_transfer_params=firsts[rid].kv_transfer_params)
        rest = run_all(d, IDS)
        for rid in IDS:
            got = firsts[rid].outputs[0].token_ids + rest[rid].outputs[0].token_ids
            assert got == ref[rid].outputs[0].token_ids, label
        assert d.core.num_computed_tokens_total == len(PROMPTS) * 7
        if check is not None:
            check(d)
        for eng in (p, d):
            for _ in range(500):
                if not eng.has_unfinished_requests():
                    break
                eng.step()
            assert eng.core.scheduler.kv_cache_manager.usage == 0.0
    finally:
        p.core.shutdown()
        d.core.shutdown()


@pytest.mark.parametrize("async_scheduling", ["auto", False])
@pytest.mark.parametrize("connector", ["shared-fs", "redis", "grpc"])
def test_disaggregated_equals_monolithic_on_gpu(connector, async_scheduling, base, tmp_path, request):
    # Only the redis case needs a server; GPU machines may have none installed (CI's CPU tests always run Redis).
    if connector == "redis" and shutil.which("redis-server") is None:
        pytest.skip("no redis-server on this GPU machine")
    redis_url = request.getfixturevalue("redis_url") if connector == "redis" else None
    ref = monolithic(base, graphs=True)
    opts = {"kv_path": str(tmp_path / "kv")}
    if redis_url:
        opts["redis_url"] = redis_url
    sched = dataclasses.replace(base.scheduler, async_scheduling=async_scheduling)
    config = dataclasses.replace(base, scheduler=sched)
    p, d = pair(config, config, connector, tuple(sorted(opts.items())))
    assert p.core.async_scheduling == d.core.async_scheduling == (async_scheduling == "auto")
    check = None
    if connector == "grpc":  # one process: CUDA IPC cannot map its own memory, so auto falls back to the stream
        def check(d: LLMEngine) -> None:
            assert d.core.kv_connector.loads_by_transport == {"stream": len(PROMPTS), "ipc": 0}
    hand_over(p, d, ref, check=check)


def test_grpc_over_cuda_ipc_between_two_processes_equals_monolithic(base):
    """The grpc connector's same-node path: the decode engine maps the prefill process's GPU cache over CUDA
    IPC and copies the blocks device to device; outputs equal the monolithic engine's, and both sides end with
    every block free."""
    prompts, ids = PROMPTS, IDS
    ref = monolithic(base)
    opts = tuple(sorted({"kv_transport": "ipc", "kv_load_timeout_s": 30.0}.items()))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=prefill_server_process, daemon=True, args=(
        child, dataclasses.replace(base, kv_transfer=KVTransferConfig("prefill", "grpc", opts, cluster_secret=SECRET)),
        prompts, ids))
    proc.start()
    try:
        assert parent.poll(300), "the prefill process did not answer"
        firsts = parent.recv()
        decode_kvt = KVTransferConfig("decode", "grpc", opts, cluster_secret=SECRET)
        d = LLMEngine(dataclasses.replace(base, kv_transfer=decode_kvt))
        assert d.core.async_scheduling  # "auto" on CUDA, with a connector too
        for rid, prompt in zip(ids, prompts):
            t0, params = firsts[rid]
            d.add_request(prompt + t0, greedy(7), request_id=rid, kv_transfer_params=params)
        rest = run_all(d, ids)
        for rid in ids:
            assert firsts[rid][0] + rest[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
        assert d.core.kv_connector.loads_by_transport == {"stream": 0, "ipc": len(prompts)}
        assert d.core.num_computed_tokens_total == len(prompts) * 7  # nothing recomputed
        assert d.core.scheduler.kv_cache_manager.usage == 0.0
        d.core.shutdown()
        parent.send("stop")
        assert parent.poll(60) and parent.recv() == 0.0  # every transfer was released
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()


def test_kv_transfer_bench_ipc_moves_exact_bytes():
    """The benchmark's two processes with the IPC transport: it checksums both caches, so a wrong copy fails."""
    from pdserve.bench.kv_transfer import bench_connector

    rows = bench_connector("grpc", {"kv_transport": "ipc", "kv_load_timeout_s": 30.0}, "smollm2-135m",
                           "bfloat16", 16, "cuda", [100, 300], 1)
    assert [r["prompt_len"] for r in rows] == [100, 300] and all(r["load_ms"] > 0 for r in rows)


@pytest.mark.parametrize("after_fence", [True, False])
def test_a_load_is_ordered_after_the_step_in_flight(after_fence):
    """Asynchronous scheduling: a step still running may write into a block freed meanwhile, which a load now
    fills on its copy stream (CUDA IPC path). Waiting on the fence taken when the load started orders the copy
    after that step; without it the step's late write (here after a 50 ms spin) lands on top of the loaded KV."""
    import torch

    from pdserve.engine.kv_transfer import kv_layout
    from pdserve.engine.kv_transfer.grpc import cuda_ipc

    shape = (2, 4, 16, 2, 8)
    peer = [torch.full(shape, 7.0, device="cuda")]
    ours = [torch.zeros(shape, device="cuda")]
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # the step in flight (~50 ms of GPU cycles) ...
    ours[0][:, 1].fill_(-1.0)  # ... and its late write into block 1
    fence = kv_layout.device_fence(ours)
    cuda_ipc.copy_blocks(peer, [2], ours, [1], torch.cuda.Stream(), after=fence if after_fence else None)
    torch.cuda.synchronize()
    loaded = bool((ours[0][:, 1] == 7.0).all())
    assert loaded == after_fence


@pytest.mark.parametrize("connector", ["shared-fs", "grpc"])
def test_tensor_parallel_sides_of_different_sizes_on_gpus(connector, base, tmp_path):
    """TP=1 -> TP=2 and back on two GPUs (NCCL ranks, CUDA graphs, float32): each rank saves or serves its own KV
    heads and the loading ranks pick theirs out of the producer's shards (issue 15, acceptance 3 on CUDA)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    def config(tp: int) -> EngineConfig:
        return EngineConfig.create(base.model.model, device="cuda", dtype="float32", num_blocks=256, block_size=16,
                                   max_model_len=512, max_num_batched_tokens=512, gpu_memory_utilization=0.3,
                                   tensor_parallel_size=tp)

    ref = monolithic(config(1))
    opts = tuple(sorted({"kv_path": str(tmp_path / "kv"), "kv_load_timeout_s": 30.0}.items()))
    for prefill_tp, decode_tp in ((1, 2), (2, 1)):
        p, d = pair(config(prefill_tp), config(decode_tp), connector, opts)
        hand_over(p, d, ref, f"TP={prefill_tp} -> TP={decode_tp}")
