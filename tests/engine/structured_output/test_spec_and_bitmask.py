"""Structured output without a model: the spec's rules, the backend's checks and the bitmask op (exact)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.frontend.fanout import after_tokens
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.structured_output.backend import check_spec
from pdserve.engine.structured_output.bitmask import apply_token_bitmask_reference, unpack_bitmask
from pdserve.engine.structured_output.params import StructuredOutputsParams as S


def test_exactly_one_constraint() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        S()
    with pytest.raises(ValueError, match="exactly one"):
        S(regex="a", choice=["b"])
    assert S(json_object=True).kind == "json_object"


def test_json_schema_keeps_property_order_and_keys_the_cache() -> None:
    a = S(json={"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}})
    b = S(json='{"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}}')
    assert a.json == '{"type":"object","properties":{"z":{"type":"integer"},"a":{"type":"string"}}}'
    assert a.cache_key() == b.cache_key() == ("json", a.json)
    assert S(choice=["x", "y"]).cache_key() == ("choice", '["x", "y"]')


def test_unknown_keys_and_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown or unsupported keys \\['jsn'\\]"):
        SamplingParams(structured_outputs={"jsn": {}})
    with pytest.raises(ValueError, match="not valid JSON"):
        S(json="{")
    with pytest.raises(ValueError, match="choice"):
        S(choice=[])
    with pytest.raises(ValueError, match="ignore_eos or min_tokens"):
        SamplingParams(structured_outputs={"regex": "a+"}, min_tokens=2)


def test_after_tokens_counts_generated_prefix() -> None:
    params = SamplingParams(max_tokens=10, structured_outputs={"regex": "a+"})
    later = after_tokens(after_tokens(params, 1), 2)
    assert later.structured_outputs.num_prefix_tokens == 3
    assert later.structured_outputs.cache_key() == params.structured_outputs.cache_key()
    assert later.max_tokens == 7


@pytest.mark.parametrize("spec, message", [
    (S(regex="a(b"),
     "invalid structured_outputs.regex: Regex parsing error at position 4: The parenthesis is not closed."),
    (S(json={"type": "strin"}), 'invalid structured_outputs.json: Unsupported type "strin"'),
    (S(json={"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
     "unsupported JSON Schema keyword 'not' at $.properties.a"),
    (S(grammar='root ::= "a" | b'), 'invalid structured_outputs.grammar: EBNF parser error at line 1, column 16: '
                                    'Rule "b" is not defined'),
])
def test_bad_specs_get_the_backends_message(spec: S, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_spec(spec)
    assert str(info.value) == message


def test_good_specs_pass() -> None:
    for spec in (S(json_object=True), S(regex="[0-9]{3}"), S(choice=['say "hi"', "no"]),
                 S(grammar='root ::= "yes" | "no"'),
                 S(json={"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}},
                         "required": ["n"], "additionalProperties": False})):
        check_spec(spec)


def test_unpack_bitmask_exact() -> None:
    # Row 0 allows tokens 0 and 33; row 1 allows everything (-1 words); V = 40 cuts the second word.
    mask = torch.tensor([[1, 2], [-1, -1]], dtype=torch.int32)
    allowed = unpack_bitmask(mask, 40)
    assert allowed.shape == (2, 40)
    assert allowed[0].nonzero().flatten().tolist() == [0, 33]
    assert bool(allowed[1].all())
    logits = torch.zeros(2, 40)
    apply_token_bitmask_reference(logits, mask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 33]
    assert bool(torch.isfinite(logits[1]).all())


def test_backend_kernel_matches_reference() -> None:
    import xgrammar as xgr

    gen = torch.Generator().manual_seed(0)
    mask = torch.randint(-2 ** 31, 2 ** 31 - 1, (5, 4), dtype=torch.int32, generator=gen)
    logits = torch.randn(5, 100, generator=gen)
    ours, theirs = logits.clone(), logits.clone()
    apply_token_bitmask_reference(ours, mask)
    xgr.apply_token_bitmask_inplace(theirs, mask, vocab_size=100)
    assert torch.equal(ours, theirs)
