"""Structured output with speculative decoding on the bundled model: drafts are cut where the grammar rejects a
token and every verified row is masked by the grammar's state after the drafts before it, so greedy outputs
under a JSON schema (and a regex) are token-identical with speculation on and off, and every output, sampled ones
included, is valid."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pdserve.engine.llm import LLM
from pdserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(900)

MODEL = "smollm2-135m-instruct"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "temperature": {"type": "integer", "minimum": -50, "maximum": 60},
                                           "sunny": {"type": "boolean"}},
          "required": ["city", "temperature", "sunny"], "additionalProperties": False}
# The prompt shows the JSON the answer repeats: the n-gram proposer finds its drafts there, and some of them
# break the schema (the key order differs), so drafts are both accepted and cut by the grammar.
PROMPT = ('Weather report: {"sunny": true, "city": "Paris", "temperature": 21}. '
          'Write the report for Paris as JSON again:')


def run(spec: dict | None) -> tuple[list[list[int]], LLM]:
    llm = LLM(MODEL, max_model_len=256, device="cpu", speculative_config=spec)
    params = [SamplingParams(max_tokens=40, temperature=0.0, structured_outputs={"json": SCHEMA}),
              SamplingParams(max_tokens=40, temperature=0.0, structured_outputs={"json_object": True}),
              SamplingParams(max_tokens=10, temperature=0.0, structured_outputs={"regex": r"Paris, [0-9]{2} C"}),
              # sampled: verified by rejection sampling over the masked rows (other tokens than without drafts)
              SamplingParams(max_tokens=48, temperature=0.8, seed=5, structured_outputs={"json": SCHEMA})]
    outs = llm.generate([PROMPT] * 4, params)
    return [list(o.outputs[0].token_ids) for o in outs], llm


def test_greedy_structured_outputs_are_identical_with_drafts(monkeypatch) -> None:
    from pdserve.engine.structured_output.manager import StructuredOutputManager

    base, _ = run(None)
    cuts = []
    checked = StructuredOutputManager.draft_prefix

    def counting(self, request, drafts):
        kept = checked(self, request, drafts)
        cuts.append(len(drafts) - len(kept))
        return kept

    monkeypatch.setattr(StructuredOutputManager, "draft_prefix", counting)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "adaptive": False}
    got, llm = run(spec)
    assert got[:3] == base[:3]
    stats = llm.engine.core.get_stats().spec_decode
    assert 0 < stats["num_accepted_tokens"] < stats["num_draft_tokens"]
    assert any(cuts) and not all(cuts)  # some drafts were cut by the grammar, others went through whole
    tok = llm.get_tokenizer()
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in got]
    jsonschema.validate(json.loads(texts[0]), SCHEMA)
    assert isinstance(json.loads(texts[1]), dict)
    assert re.fullmatch(r"Paris, [0-9]{2} C", texts[2])
    jsonschema.validate(json.loads(texts[3]), SCHEMA)
