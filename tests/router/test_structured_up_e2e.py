"""Issue 14 acceptance, point 2: structured output through ``pdserve up`` (router + prefill + decode) with each KV
connector, streamed and not, with the official ``openai`` client.

The prompts are long enough for the router to prefill them remotely: the prefill pod samples the first token under
the constraint, the decode pod advances its matcher over that token (``num_prefix_tokens``) and continues. Every
answer is checked (``jsonschema``, the regex); the router's metrics prove the remote-prefill path was taken.
"""

from __future__ import annotations

import json
import re
import urllib.request

import jsonschema
import pytest

from tests.helpers.pdserve_up import ENGINE_FLAGS, MODEL, PdserveProcess, free_port, running_pdserve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
openai = pytest.importorskip("openai")

LONG = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60))
SCHEMA = {"type": "object", "properties": {"number": {"type": "integer", "minimum": 0, "maximum": 59},
                                           "parity": {"enum": ["even", "odd"]}},
          "required": ["number", "parity"], "additionalProperties": False}
REGEX = r"(even|odd) number [0-9]{1,2}"


@pytest.fixture(scope="module", params=["shared-fs", "grpc", "redis"])
def up_url(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"up-{request.param}")
    up = PdserveProcess(["up", "--port", str(free_port()), "--kv-connector", request.param, "--engine-args",
                         ENGINE_FLAGS], work, "up.log")
    with running_pdserve(up):
        yield f"{up.url}/v1"


def remote_prefills(url: str) -> float:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    key = 'pdserve:router_pd_decisions_total{decision="remote-prefill",reason="remote-prefill"} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))


def test_constrained_answers_through_prefill_and_decode(up_url):
    client = openai.OpenAI(base_url=up_url, api_key="unused", max_retries=0, timeout=300)
    before = remote_prefills(up_url)
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": LONG + " Pick one fact as JSON."}], max_tokens=30,
        temperature=0.7, seed=1, response_format={"type": "json_schema",
                                                  "json_schema": {"name": "fact", "schema": SCHEMA}})
    jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMA)
    stream = client.completions.create(model=MODEL, prompt=LONG + " One of them:", max_tokens=12, temperature=0.7,
                                       seed=2, stream=True, extra_body={"structured_outputs": {"regex": REGEX}})
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert re.fullmatch(REGEX, text), text
    assert remote_prefills(up_url) - before == 2
