"""Several tokens in one core output (speculative decoding): a stop string found among them drops the tokens after
it, so the output equals what one token per step gives."""

from __future__ import annotations

import pytest

from pdserve.engine.frontend.output_processor import OutputProcessor
from pdserve.engine.outputs import EngineCoreOutput
from pdserve.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    from pdserve.engine.frontend.tokenizer import load_tokenizer
    from pdserve.engine.model_loader import resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct", "auto").tokenizer_path)


def test_tokens_after_a_stop_string_are_dropped(tokenizer) -> None:
    ids = tokenizer.encode(" one two three four five")
    params = SamplingParams(stop=["three"], max_tokens=20)
    results = []
    for chunks in ([ids], [[t] for t in ids]):  # all in one output, then one token per output
        proc = OutputProcessor(tokenizer)
        proc.add_sequence("s", "s", 0, None, [1], params)
        out = []
        for chunk in chunks:
            out += proc.process([EngineCoreOutput("s", chunk)]).request_outputs
            if out:
                break
        results.append((out[-1].outputs[0].token_ids, out[-1].outputs[0].text, out[-1].outputs[0].finish_reason))
    assert results[0] == results[1]
    assert results[0][1] == " one two " and results[0][2] == "stop"
    assert len(results[0][0]) < len(ids)
