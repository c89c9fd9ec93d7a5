"""Acceptance: through ``pdserve up`` (router + prefill + decode processes) the official ``openai`` client gets the
same greedy answers as from a monolithic ``pdserve serve``: completions and chat, streamed and not.

The decode pod speculates (n-gram prompt lookup, ``--decode-args``) and the monolithic server does not, so every
answer here also shows speculative decoding token-identical to plain decoding, after a KV handover. Both pods run
with asynchronous scheduling (forced), the monolithic server synchronously."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.helpers.pdserve_up import ENGINE_FLAGS, MODEL, PdserveProcess, free_port, running_pdserve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
openai = pytest.importorskip("openai")

PROMPTS = ["The capital of France is", "List three prime numbers:", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "Name three colours."}]
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    work = tmp_path_factory.mktemp("up")
    up_port, mono_port, decode_metrics = free_port(), free_port(), free_port()
    decode_args = f"--speculative-config '{json.dumps(SPEC)}' --metrics-port {decode_metrics}"
    # Both pods schedule asynchronously (forced: CPU defaults to off), the monolithic reference synchronously.
    up = PdserveProcess(["up", "--port", str(up_port), "--engine-args", f"{ENGINE_FLAGS} --async-scheduling",
                         "--decode-args", decode_args], work, "up.log")
    # The reference server holds the tests' cluster secret, so it takes calls with a token or its API key (given in
    # the environment, as PDSERVE_API_KEY): the key the client below sends.
    mono = PdserveProcess(["serve", "--model", MODEL, "--port", str(mono_port), *ENGINE_FLAGS.split()], work,
                          "serve.log", env={**os.environ, "PDSERVE_API_KEY": "unused"})
    with running_pdserve(mono, up):
        yield f"{up.url}/v1", f"{mono.url}/v1", up.proc, work, decode_metrics


def answers(base_url: str) -> list[str]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    out = []
    for prompt in PROMPTS:
        out.append(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text)
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        out.append("".join(c.choices[0].text for c in stream if c.choices))
    out.append(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24,
                                              temperature=0).choices[0].message.content)
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True)
    out.append("".join((c.choices[0].delta.content or "") for c in stream if c.choices))
    return out


def test_openai_client_gets_the_monolithic_answers(servers):
    up_url, mono_url, _, work, _ = servers
    assert answers(up_url) == answers(mono_url)
    # Both pods' engine cores (their startup lines in up's log) scheduled asynchronously.
    assert (work / "up.log").read_text(errors="replace").count("async scheduling on") == 2


async def test_async_client_and_a_long_prompt_with_remote_prefill(servers):
    up_url, mono_url, _, _, _ = servers
    long_prompt = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60))
    results = []
    for url in (up_url, mono_url):
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        r = await client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=16, temperature=0)
        results.append(r.choices[0].text)
    assert results[0] == results[1]
    import urllib.request

    with urllib.request.urlopen(up_url.removesuffix("/v1") + "/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    # The long prompt went through the prefill pod and its KV through the connector to the decode pod.
    assert 'pdserve:router_pd_decisions_total{decision="remote-prefill",reason="remote-prefill"}' in metrics


def test_decode_pod_speculates_on_a_copy_heavy_prompt(servers):
    """After a KV handover from the prefill pod, the speculating decode pod continues a repetitive text exactly
    as the monolithic engine does, and its /metrics count accepted drafts."""
    up_url, mono_url, _, _, decode_metrics = servers
    prompt = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(50))
    texts = []
    for url in (up_url, mono_url):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        texts.append(client.completions.create(model=MODEL, prompt=prompt, max_tokens=40,
                                               temperature=0).choices[0].text)
    assert texts[0] == texts[1] and "Fact 50" in texts[0]
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{decode_metrics}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("pdserve:spec_decode_num_") and "_per_pos" not in line}
    accepted = values["pdserve:spec_decode_num_accepted_tokens_total"]
    assert 10 < accepted <= values["pdserve:spec_decode_num_draft_tokens_total"]


def test_prompt_scoring_through_the_router(servers, monkeypatch, tmp_path):
    """Issue 13: echo + logprobs through the router, the prompt's logprobs computed by the prefill pod (a long
    prompt is prefilled remotely), and lm-evaluation-harness's loglikelihoods through the router: both equal
    transformers' within 1e-3."""
    import urllib.request

    from pdserve.engine.model_loader.bundled import ensure_bundled
    from tests.helpers.lm_eval_check import HfScorer, assert_samples_match, run_lm_eval

    up_url, *_ = servers
    model_dir = str(ensure_bundled(MODEL))
    scorer = HfScorer(model_dir)
    long_prompt = " ".join(f"Note {i}: the colour of box {i} is {'red' if i % 3 else 'blue'}." for i in range(30))
    ids = scorer.encode(long_prompt)
    assert len(ids) > 256  # over the prefix-aware decider's threshold: remote prefill

    def remote_prefills() -> float:
        with urllib.request.urlopen(up_url.removesuffix("/v1") + "/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith('pdserve:router_pd_decisions_total{decision="remote-prefill"'):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = remote_prefills()
    client = openai.OpenAI(base_url=up_url, api_key="unused", max_retries=0, timeout=120)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert remote_prefills() == before + 1
    got = out.choices[0].logprobs.token_logprobs
    assert got[0] is None and len(got) == len(ids)
    assert got[1:] == pytest.approx(scorer.token_logprobs(ids), abs=1e-3)

    samples = run_lm_eval(f"{up_url}/completions", MODEL, model_dir, "unused", ["pdserve_tiny_mc", "pdserve_tiny_ppl"],
                          monkeypatch, tmp_path / "datasets")
    assert assert_samples_match(samples, scorer) == 3 * 3 + 2  # multiple choice, then rolling (perplexity)


def test_ctrl_c_stops_every_part(servers):
    _, _, up, work, _ = servers
    children = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 3  # prefill, decode, router
    up.send_signal(signal.SIGINT)
    assert up.wait(60) == 0
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
