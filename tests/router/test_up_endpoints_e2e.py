"""Through ``pdserve up`` (router + prefill pod + decode pod): the Responses API (official ``openai`` client) and
the Messages API (official ``anthropic`` client) run the prefill->decode path of chat and answer as the router's
chat endpoint does; ``/reset_prefix_cache`` reaches every pod; ``/v1/models/{id}`` and ``/version`` are served;
``/v1/embeddings`` is refused (the deployment has no pooling runner)."""

from __future__ import annotations

import re
import urllib.request

import httpx
import pytest

from tests.helpers.pdserve_up import ENGINE_FLAGS, MODEL, PdserveProcess, free_port, running_pdserve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")


def question(start: int) -> str:
    """A prompt just over the P/D decider's 256 tokens, so the router prefills it on the prefill pod; a different
    ``start`` per test, or the repeat would be cached on the decode pod (and prefilled there)."""
    facts = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(start,
                                                                                                   start + 22))
    return f"{facts} Is {start + 7} even or odd?"


REMOTE = 'pdserve:router_pd_decisions_total{decision="remote-prefill",reason="remote-prefill"}'


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    work = tmp_path_factory.mktemp("up-endpoints")
    up = PdserveProcess(["up", "--port", str(free_port()), "--engine-args", ENGINE_FLAGS], work, "up.log")
    with running_pdserve(up):
        yield up.url


def remote_prefills(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        m = re.search(re.escape(REMOTE) + r" (\S+)", resp.read().decode())
    return float(m.group(1)) if m else 0.0


def chat_answer(url: str, messages: list[dict]) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    return r.choices[0].message.content


def test_responses_through_prefill_and_decode(up):
    QUESTION = question(100)
    client = openai.OpenAI(base_url=f"{up}/v1", api_key="unused", max_retries=0, timeout=300)
    before = remote_prefills(up)
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0)
    assert remote_prefills(up) == before + 1, "the prompt should be prefilled on the prefill pod"
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0,
                                          stream=True))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    want = chat_answer(up, [{"role": "user", "content": QUESTION}])
    assert r.output_text == streamed == want
    follow = client.responses.create(model=MODEL, input="And 8?", previous_response_id=r.id, max_output_tokens=4,
                                     temperature=0)
    assert follow.output_text == chat_answer(up, [{"role": "user", "content": QUESTION},
                                                  {"role": "assistant", "content": r.output_text},
                                                  {"role": "user", "content": "And 8?"}])[:len(follow.output_text)]


def test_messages_through_prefill_and_decode(up):
    QUESTION = question(300)
    client = anthropic.Anthropic(base_url=up, api_key="unused", max_retries=0, timeout=300)
    before = remote_prefills(up)
    m = client.messages.create(model=MODEL, max_tokens=12, system="Be brief.",
                               messages=[{"role": "user", "content": QUESTION}], extra_body={"temperature": 0})
    assert remote_prefills(up) == before + 1
    with client.messages.stream(model=MODEL, max_tokens=12, system="Be brief.", extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        streamed = stream.get_final_message()
    want = chat_answer(up, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}])
    assert m.content[0].text == streamed.content[0].text == want


def test_usage_reports_cached_tokens_through_the_router(up):
    """usage.prompt_tokens_details.cached_tokens behind the router: the prefix-cache hits of the pod that computed
    the prompt. A long prompt is prefilled on the prefill pod (nothing cached); its repeat runs on the decode pod,
    which holds the prompt's KV since the handover (a Generate stream). A short one runs on the decode pod twice."""
    client = openai.OpenAI(base_url=f"{up}/v1", api_key="unused", max_retries=0, timeout=300)
    short = " ".join(f"Fact {i}: the number {i} is odd." for i in range(701, 713, 2))  # under the P/D threshold
    for prompt, remote in ((question(500), 1), (short, 0)):
        before = remote_prefills(up)
        first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        usage = [c for c in second if c.usage is not None][-1].usage
        assert remote_prefills(up) == before + remote, "only the long prompt's first run is prefilled remotely"
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        # The repeat finds at least every full 16-token block of the prompt, never its last token (recomputed).
        cached = usage.prompt_tokens_details.cached_tokens
        assert (usage.prompt_tokens - 1) // 16 * 16 <= cached <= usage.prompt_tokens - 1 and cached >= 32, usage


def test_admin_endpoints_through_the_router(up):
    r = httpx.post(f"{up}/reset_prefix_cache", timeout=30)
    assert r.status_code == 200, r.text
    pods = r.json()["pods"]
    assert len(pods) == 2 and set(pods.values()) == {"ok"}
    assert httpx.get(f"{up}/v1/models/{MODEL}").json()["id"] == MODEL
    assert httpx.get(f"{up}/v1/models/nope").status_code == 404
    assert httpx.get(f"{up}/version").json()["version"]
    r = httpx.post(f"{up}/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert r.status_code == 400 and "pooling" in r.json()["error"]["message"]
