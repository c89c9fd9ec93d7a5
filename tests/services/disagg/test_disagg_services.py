"""The disaggregated services for real: ``pdserve prefill`` and ``pdserve decode`` processes, the gRPC Prefill
and Decode calls through a minimal client (tests/helpers/disagg_client.py), on a tiny random Llama (token-id prompts).

- greedy answers through prefill -> decode equal the offline monolithic engine's (the engine-level tests in
  tests/kv_transfer cover every connector; the pods here use grpc, the connector whose failures are the pods' own);
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
from tests.helpers.disagg_client import DisaggClient
from tests.helpers.tiny_models import make_tiny_model

MAX_TOKENS = 6
# No shared prefix: each prompt loads all of its blocks (1, 2 and 3), whatever order they are admitted in.
PROMPTS = [[5 + (7 * i + 101 * k) % 400 for i in range(n)] for k, n in enumerate((9, 21, 40))]


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
    from pdserve.engine.security import load_cluster_secret

    proxy = DisaggClient(prefill.grpc_target, decode.grpc_target, timeout_s=120, cluster_secret=load_cluster_secret())
    try:
        outs = await asyncio.gather(*(proxy.complete(request(p, f"r{i}")) for i, p in enumerate(prompts)))
    finally:
        await proxy.close()
    return [ids for ids, _, _ in outs]


@pytest.fixture(scope="module")
def pods(model):
    """One prefill pod and two decode pods (policies recompute and fail), all with the grpc connector."""
    started = []
    try:
        for role, flags in (("prefill", []), ("decode", ["--kv-load-failure-policy", "recompute"]),
                            ("decode", ["--kv-load-failure-policy", "fail"])):
            started.append(start_role_server(role, model, "--kv-connector", "grpc", *flags))
        yield started
    finally:
        for server in started:
            stop_role_server(server)


def test_prefill_then_decode_equals_monolithic(pods, reference):
    prefill, decode, _ = pods
    assert asyncio.run(through_proxy(prefill, decode, PROMPTS)) == reference
    decode.wait_no_blocks_in_use()
    prefill.wait_no_blocks_in_use()  # released by the decode pod's acknowledgements
    assert decode.metric("kv_transfer_blocks_total", connector="grpc", direction="load") == \
        sum(-(-len(p) // 16) for p in PROMPTS)
    assert decode.metric("kv_transfer_failures_total") == 0


def test_openai_http_prefill_then_decode_with_the_handle(pods, reference):
    """The same hand-over through the OpenAI HTTP API and the real openai client: the prefill pod's completion
    carries ``kv_transfer_params``; the decode pod, given it, loads the prompt's KV (no failure, blocks counted)
    and answers what it answers when it computes everything itself."""
    import openai

    prefill, decode, _ = pods
    prompt = PROMPTS[2]
    body = {"ignore_eos": True}
    # Pods hold the cluster secret (tests/conftest.py): a direct caller signs as the router does.
    pre = openai.OpenAI(base_url=f"{prefill.url}/v1", api_key="x",
                        default_headers=pod_auth()).completions.create(
        model=prefill.model, prompt=prompt, max_tokens=1, temperature=0.0, extra_body=body)
    handle = pre.model_extra["kv_transfer_params"]
    assert handle["num_tokens"] == len(prompt) and handle["connector"] == "grpc"
    client = openai.OpenAI(base_url=f"{decode.url}/v1", api_key="x", default_headers=pod_auth())
    loaded_before = decode.metric("kv_transfer_blocks_total", connector="grpc", direction="load")
    with_kv = client.completions.create(model=decode.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                        extra_body={**body, "kv_transfer_params": handle})
    assert decode.metric("kv_transfer_blocks_total", connector="grpc", direction="load") > loaded_before
    assert decode.metric("kv_transfer_failures_total") == 0
    assert "kv_transfer_params" not in (with_kv.model_extra or {})  # only a prefill pod hands KV on
    local = client.completions.create(model=decode.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                      extra_body=body)
    assert with_kv.choices[0].text == local.choices[0].text and with_kv.usage.completion_tokens == MAX_TOKENS
    prefill.wait_no_blocks_in_use()
    with pytest.raises(openai.BadRequestError, match="kv_transfer_params"):
        client.completions.create(model=decode.model, prompt=prompt, max_tokens=2,
                                  extra_body={"kv_transfer_params": {"connector": "grpc"}})


def pod_auth() -> dict[str, str]:
    """A fresh call token under the pods' cluster secret (what the router sends)."""
    from pdserve.engine.security import load_cluster_secret
    from pdserve.services.api.auth import ENGINE_SCOPE

    return load_cluster_secret().call_headers(ENGINE_SCOPE)


async def prefill_call(prefill, prompt, rid):
    from pdserve.proto.pdserve.v1 import disagg_pb2_grpc

    async with grpc.aio.insecure_channel(prefill.grpc_target) as ch:
        return await disagg_pb2_grpc.PrefillStub(ch).Prefill(disagg_pb2.PrefillRequest(request=request(prompt, rid)),
                                                             metadata=tuple(pod_auth().items()))


async def decode_call(decode, pre):
    from pdserve.proto.pdserve.v1 import disagg_pb2_grpc

    follow = request(list(pre.prompt_token_ids) + list(pre.choice.token_ids), pre.request_id)
    follow.sampling_params.max_tokens = pre.max_tokens - 1
    ids = list(pre.choice.token_ids)
    async with grpc.aio.insecure_channel(decode.grpc_target) as ch:
        stream = disagg_pb2_grpc.DecodeStub(ch).Decode(disagg_pb2.DecodeRequest(
            request=follow, kv_transfer_params=pre.kv_transfer_params), timeout=120,
            metadata=tuple(pod_auth().items()))
        async for resp in stream:
            for choice in resp.choices:
                ids.extend(choice.token_ids)
    return ids


def test_http_malformed_and_forged_handles(pods, reference):
    """A malformed handle is a 400 naming the field without a Python repr; a forged one (its KV server changed)
    is never dialled: a 409 under the fail policy, a local computation under recompute (issue 11)."""
    import openai

    def pod_client(url: str, **kw):  # pods take calls signed with the cluster secret, as the router makes them
        return openai.OpenAI(base_url=f"{url}/v1", api_key="x", default_headers=pod_auth(), **kw)

    prefill, recompute, fail = pods
    prompt = PROMPTS[2]
    with pytest.raises(openai.BadRequestError) as bad:
        pod_client(recompute.url).completions.create(
            model=recompute.model, prompt=prompt, max_tokens=2,
            extra_body={"kv_transfer_params": {"connector": "grpc"}})
    assert "lacks 'transfer_id'" in str(bad.value) and "Error(" not in str(bad.value)
    pre = pod_client(prefill.url).completions.create(
        model=prefill.model, prompt=prompt, max_tokens=1, temperature=0.0, extra_body={"ignore_eos": True})
    handle = pre.model_extra["kv_transfer_params"]
    forged = {**handle, "kv_server": "127.0.0.1:9"}
    with pytest.raises(openai.APIStatusError) as conflict:
        pod_client(fail.url, max_retries=0).completions.create(  # 409 is retried
            model=fail.model, prompt=prompt, max_tokens=2, extra_body={"kv_transfer_params": forged})
    assert conflict.value.status_code == 409 and "does not verify" in str(conflict.value)
    assert fail.metric("kv_transfer_failures_total", reason="bad_handle") == 1
    # The genuine handle still works (and its pull releases the prefill pod's blocks).
    client = pod_client(recompute.url)
    out = client.completions.create(model=recompute.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                    extra_body={"ignore_eos": True, "kv_transfer_params": handle})
    assert out.usage.completion_tokens == MAX_TOKENS
    prefill.wait_no_blocks_in_use()
    fail.wait_no_blocks_in_use()


def test_prefill_pod_killed_before_decode_loaded(pods, reference):
    """Runs last: it kills the prefill pod (SIGKILL, after it answered, before anyone pulled its blocks)."""
    prefill, recompute, fail = pods
    first = asyncio.run(prefill_call(prefill, PROMPTS[1], "k1"))
    second = asyncio.run(prefill_call(prefill, PROMPTS[1], "k2"))
    kill_pod(prefill)
    assert asyncio.run(decode_call(recompute, first)) == reference[1]
    assert recompute.metric("kv_transfer_failures_total", connector="grpc", reason="peer_gone") == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(decode_call(fail, second))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "KV transfer failed (peer_gone)" in info.value.details()
    recompute.wait_no_blocks_in_use()
    fail.wait_no_blocks_in_use()
