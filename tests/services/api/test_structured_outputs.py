"""Issue 14 acceptance, points 1 and 4: structured output through the official ``openai`` client against a real
``pdserve serve`` with the bundled model. Every answer is checked (parsed and validated with ``jsonschema``,
matched against the regex, the choice, the grammar's language); bad specs are 400s and the server serves on."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest

from api_servers import MODEL

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "ok": {"type": "boolean"}}, "required": ["color", "ok"]},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 1,
                                                                             "maximum": 9},
                                                 "minItems": 1, "maxItems": 4}}, "required": ["scores"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number", "minimum": -10,
                                                                      "maximum": 10}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"]},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                                      "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
     "required": ["city", "tags", "rating"]},
]


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0)


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_100_json_schema_requests_all_validate(real_server) -> None:
    aclient = openai.AsyncOpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0)

    async def one(i: int) -> tuple[dict, str, str]:
        schema = SCHEMAS[i % len(SCHEMAS)]
        resp = await aclient.chat.completions.create(
            model=MODEL, messages=chat(f"Reply with a JSON object, example {i}."), temperature=0.7, seed=i,
            max_tokens=60, response_format={"type": "json_schema",
                                            "json_schema": {"name": f"s{i % 5}", "schema": schema, "strict": True}})
        return schema, resp.choices[0].message.content, resp.choices[0].finish_reason

    async def all_of_them() -> list:
        try:
            return await asyncio.gather(*(one(i) for i in range(100)))
        finally:
            await aclient.close()

    for schema, text, finish in asyncio.run(all_of_them()):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert real_server.metric("structured_output_requests_total") >= 100
    assert real_server.metric("structured_output_cache_hits_total") >= 95  # five schemas, compiled once each


def test_regex_choice_grammar_and_json_object(client) -> None:
    for i in range(3):
        out = client.completions.create(model=MODEL, prompt="My phone number is", max_tokens=20, temperature=0.9,
                                        seed=i, extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
        assert re.fullmatch(r"\d{3}-\d{4}", out.choices[0].text), out.choices[0].text
    resp = client.chat.completions.create(model=MODEL, messages=chat("Is the sky blue?"), max_tokens=10, n=3,
                                          temperature=1.0, extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert all(c.message.content in ("yes", "no", "maybe") for c in resp.choices)
    gbnf = 'root ::= "(" num " + " num ") = " num\nnum ::= [1-9] [0-9]?'
    resp = client.chat.completions.create(model=MODEL, messages=chat("Write a sum."), max_tokens=20,
                                          temperature=0.8, extra_body={"structured_outputs": {"grammar": gbnf}})
    assert re.fullmatch(r"\([1-9][0-9]? \+ [1-9][0-9]?\) = [1-9][0-9]?", resp.choices[0].message.content)
    resp = client.chat.completions.create(model=MODEL, messages=chat("Give me JSON about a cat."), max_tokens=60,
                                          temperature=0.0, response_format={"type": "json_object"})
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_streamed_json_schema(client) -> None:
    schema = SCHEMAS[1]
    stream = client.chat.completions.create(
        model=MODEL, messages=chat("A color?"), max_tokens=30, temperature=0.7, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", 'invalid structured_outputs.json: Unsupported type "strin"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "not": {"const": "b"}}}}}}},
     "response_format", "unsupported JSON Schema keyword 'not' at $.properties.a"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs",
     "invalid structured_outputs.regex: Regex parsing error at position 4: The parenthesis is not closed."),
    ({"guided_grammar": "root ::= foo"}, "guided_grammar",
     'invalid structured_outputs.grammar: EBNF parser error at line 1, column 10: Rule "foo" is not defined'),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice",
     "set at most one output constraint; got guided_regex, guided_choice"),
])
def test_bad_specs_are_400_and_the_server_serves_on(client, body, param, message) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=5, extra_body=body)
    err = info.value.body
    assert (err["param"], err["message"]) == (param, message)
    # Greedy with room to spare: sampled, the grammar lets "fine" take a token per letter (3 tokens cut it short).
    ok = client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=8, temperature=0,
                                        extra_body={"guided_choice": ["fine"]})
    assert ok.choices[0].message.content == "fine"


def test_grpc_api_takes_the_same_constraints(real_server) -> None:
    import grpc

    from pdserve.engine.frontend.params_wire import sampling_to_pb
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.proto.pdserve.v1 import generate_pb2 as pb
    from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc

    auth = (("authorization", f"Bearer {real_server.api_key}"),)
    with grpc.insecure_channel(real_server.grpc_target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        params = SamplingParams(max_tokens=10, temperature=1.0, seed=3,
                                structured_outputs={"choice": ["alpha", "beta"]})
        req = pb.GenerateRequest(text="Pick one:", sampling_params=sampling_to_pb(params))
        text = "".join(c.text for r in stub.Generate(req, metadata=auth, timeout=120) for c in r.choices)
        assert text in ("alpha", "beta")
        bad = pb.GenerateRequest(text="x", sampling_params=pb.SamplingParams(
            max_tokens=3, structured_outputs=pb.StructuredOutputs(regex="a(b")))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(bad, metadata=auth, timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Regex parsing error at position 4" in info.value.details()
