"""Structured output in the engine with the bundled model, token for token across engine shapes: synchronous,
asynchronous scheduling (constrained requests take the synchronous fallback), and a tight engine that chunks
prefills and preempts (the matcher follows the output tokens, which preemption keeps). Seeded sampling makes
every engine give the same tokens; every answer obeys its constraint; ``n > 1`` and prefix-cache hits included."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pdserve.engine.llm import LLM
from pdserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(900)

MODEL = "smollm2-135m-instruct"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}}, "required": ["n", "ok"],
          "additionalProperties": False}
PROMPT = "Write a short answer about the weather in a city you like, please:"


def requests() -> tuple[list[str], list[SamplingParams]]:
    prompts = [PROMPT, PROMPT, PROMPT + " Number?", PROMPT + " plain"]
    params = [SamplingParams(max_tokens=24, temperature=0.8, seed=1, n=2, structured_outputs={"json": SCHEMA}),
              SamplingParams(max_tokens=12, temperature=0.8, seed=2, structured_outputs={"regex": r"[A-Z][a-z]{2,6}"}),
              SamplingParams(max_tokens=8, temperature=0.8, seed=3, structured_outputs={"choice": ["12", "7", "no"]}),
              SamplingParams(max_tokens=12, temperature=0.8, seed=4)]
    return prompts, params


def run(llm: LLM) -> list[list[str]]:
    prompts, params = requests()
    return [[c.text for c in out.outputs] for out in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def sync_llm() -> LLM:
    return LLM(MODEL, max_model_len=256, device="cpu")


@pytest.fixture(scope="module")
def reference(sync_llm) -> list[list[str]]:
    return run(sync_llm)


def test_answers_obey_their_constraints(reference) -> None:
    (j1, j2), (word,), (choice,), (plain,) = reference
    for text in (j1, j2):
        jsonschema.validate(json.loads(text), SCHEMA)
    assert re.fullmatch(r"[A-Z][a-z]{2,6}", word) and choice in ("12", "7", "no") and plain


@pytest.mark.parametrize("kwargs", [
    dict(async_scheduling=True),
    # 16-token chunks and 7 blocks of 16 tokens for 5 sequences of ~40 tokens: chunked prefill and preemption.
    dict(max_num_batched_tokens=16, num_blocks=7, block_size=16),
], ids=["async", "chunked-preempted"])
def test_other_engine_shapes_give_the_same_tokens(reference, kwargs) -> None:
    llm = LLM(MODEL, max_model_len=256, device="cpu", **kwargs)
    assert run(llm) == reference
    if "num_blocks" in kwargs:
        assert llm.engine.core.get_stats().num_preemptions > 0


def test_offline_api_refuses_a_bad_spec_up_front(sync_llm) -> None:
    with pytest.raises(ValueError, match="Regex parsing error at position 4"):
        sync_llm.generate(["hi"], SamplingParams(max_tokens=4, structured_outputs={"regex": "a(b"}))
    assert not sync_llm.engine.has_unfinished_requests()
