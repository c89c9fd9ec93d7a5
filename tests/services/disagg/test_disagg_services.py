"""The disaggregated services for real: ``pdserve prefill`` and ``pdserve decode`` processes, the gRPC Prefill
and Decode calls through the minimal proxy, on a tiny random Llama (token-id prompts).

- greedy answers through prefill -> decode equal the offline monolithic engine's (grpc and shared-fs);
- a prefill pod killed (SIGKILL) after it answered but before the decode pod loaded: the answer is still right,
  the decode pod frees everything and counts the failure;
- under ``--kv-load-failure-policy fail`` the same fault is a clear FAILED_PRECONDITION error.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from disagg_servers import kill_pod, start_role_server, stop_role_server
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto.pdserve.v1 import disagg_pb2
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.services.proxy.proxy import DisaggProxy
from tests.helpers.tiny_models import make_tiny_model

MAX_TOKENS = 6
PROMPTS = [[5 + (7 * i) % 400 for i in range(n)] for n in (9, 21, 40)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("disagg-svc") / "llama")


@pytest.fixture(scope="module")
def reference(model):
    cfg = EngineConfig.create(model, device="cpu", num_blocks=64, max_model_len=256, block_size=16)
    eng = LLMEngine(cfg)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        eng.add_request(p, params, request_id=str(i))
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(PROMPTS))]


def request(prompt: list[int], rid: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=prompt), sampling_params=pb.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))


async def through_proxy(prefill, decode, prompts) -> list[list[int]]:
    proxy = DisaggProxy(prefill.grpc_target, decode.grpc_target, timeout_s=120)
    try:
        outs = await asyncio.gather(*(proxy.complete(request(p, f"r{i}")) for i, p in enumerate(prompts)))
    finally:
        await proxy.close()
    return [ids for ids, _, _ in outs]


@pytest.mark.parametrize("connector", ["grpc", "shared-fs"])
def test_prefill_then_decode_equals_monolithic(connector, model, reference, tmp_path):
    flags = ["--kv-connector", connector, "--kv-path", str(tmp_path / "kv")]
    prefill = start_role_server("prefill", model, *flags)
    try:
        decode = start_role_server("decode", model, *flags)
        try:
            assert asyncio.run(through_proxy(prefill, decode, PROMPTS)) == reference
            decode.wait_no_blocks_in_use()
            prefill.wait_no_blocks_in_use()  # grpc: released by the decode pod's acknowledgements
            assert decode.metric("kv_transfer_blocks_total", connector=connector, direction="load") == \
                sum(-(-len(p) // 16) for p in PROMPTS)
        finally:
            stop_role_server(decode)
    finally:
        stop_role_server(prefill)


async def prefill_then_kill_then_decode(prefill, decode, prompt):
    async with grpc.aio.insecure_channel(prefill.grpc_target) as ch:
        from pdserve.proto.pdserve.v1 import disagg_pb2_grpc

        pre = await disagg_pb2_grpc.PrefillStub(ch).Prefill(disagg_pb2.PrefillRequest(request=request(prompt, "k")))
    kill_pod(prefill)  # answered, then died before anyone pulled its blocks
    follow = request(list(pre.prompt_token_ids) + list(pre.choice.token_ids), "k")
    follow.sampling_params.max_tokens = pre.max_tokens - 1
    async with grpc.aio.insecure_channel(decode.grpc_target) as ch:
        from pdserve.proto.pdserve.v1 import disagg_pb2_grpc

        stream = disagg_pb2_grpc.DecodeStub(ch).Decode(disagg_pb2.DecodeRequest(
            request=follow, kv_transfer_params=pre.kv_transfer_params), timeout=120)
        ids = list(pre.choice.token_ids)
        async for resp in stream:
            for choice in resp.choices:
                ids.extend(choice.token_ids)
    return ids


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_prefill_pod_killed_before_decode_loaded(policy, model, reference):
    prefill = start_role_server("prefill", model, "--kv-connector", "grpc")
    try:
        decode = start_role_server("decode", model, "--kv-connector", "grpc", "--kv-load-failure-policy", policy)
        try:
            if policy == "recompute":
                assert asyncio.run(prefill_then_kill_then_decode(prefill, decode, PROMPTS[1])) == reference[1]
                assert decode.metric("kv_transfer_failures_total", connector="grpc", reason="peer_gone") == 1
            else:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    asyncio.run(prefill_then_kill_then_decode(prefill, decode, PROMPTS[1]))
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "KV transfer failed (peer_gone)" in info.value.details()
            decode.wait_no_blocks_in_use()
        finally:
            stop_role_server(decode)
    finally:
        stop_role_server(prefill)
