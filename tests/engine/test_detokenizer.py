"""Incremental detokenization equals a one-shot decode; stop strings cut the text."""

from __future__ import annotations

import pytest

from pdserve.engine.frontend.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from pdserve.engine.model_loader import resolve_model
    from pdserve.engine.frontend.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model("smollm2-135m-instruct", "auto").tokenizer_path)


TEXTS = ["Hello, world! Ünïcödé — 東京 🙂 fine.", "  leading spaces and\nnew lines\n\n", "def f(x):\n    return x**2"]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(tokenizer, text: str) -> None:
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tokenizer, prompt)
    streamed = ""
    for t in ids:
        assert d.append([t]) is None
        streamed += d.take_delta()
    streamed += d.flush()
    assert streamed == d.text == tokenizer.decode(ids)


def test_stop_string_cuts_text_and_is_held_back_while_streaming(tokenizer) -> None:
    ids = tokenizer(" one two three four", add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tokenizer, [], stop=["three"])
    deltas, stop = [], None
    for t in ids:
        stop = d.append([t])
        deltas.append(d.take_delta())
        if stop:
            break
    assert stop == "three"
    assert d.text == " one two "
    assert "".join(deltas) + d.flush() == " one two "


def test_include_stop_string(tokenizer) -> None:
    ids = tokenizer("a b STOP c", add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tokenizer, [], stop=["STOP"], include_stop_str_in_output=True)
    assert d.append(ids) == "STOP"
    assert d.text == "a b STOP"


@pytest.mark.parametrize("text", TEXTS)
def test_bulk_detokenization_equals_incremental(tokenizer, text: str) -> None:
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    incremental = IncrementalDetokenizer(tokenizer, prompt)
    incremental.append(ids)
    bulk = IncrementalDetokenizer(tokenizer, prompt)
    bulk.append_all(ids)
    assert bulk.text == incremental.text


def test_fast_decoder_is_the_tokenizers_own_decode(tokenizer) -> None:
    """The direct backend decode is taken for the bundled (stock fast) tokenizer and gives the same text as
    ``tokenizer.decode`` on random id windows, special tokens included, with and without skipping them; a tokenizer
    with clean-up on, or with a decode of its own, keeps its own decode."""
    import random

    from pdserve.engine.frontend.detokenizer import decoder_for

    decode = decoder_for(tokenizer)
    assert decode.__code__ is not decoder_for(object()).__code__  # the direct path was chosen
    rng = random.Random(0)
    specials = list(tokenizer.all_special_ids)
    for _ in range(500):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 9))] + rng.sample(specials, 1)
        rng.shuffle(ids)
        for skip in (True, False):
            assert decode(ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)

    class OwnDecode(type(tokenizer)):
        def decode(self, ids, **kwargs):
            return "custom"

    custom = OwnDecode.__new__(OwnDecode)
    custom.__dict__.update(tokenizer.__dict__)
    assert decoder_for(custom)([1, 2], True) == "custom"

    class CleanUp:  # a stand-in with clean-up on: the direct path would skip it
        backend_tokenizer = tokenizer.backend_tokenizer
        clean_up_tokenization_spaces = True

        def decode(self, ids, skip_special_tokens):
            return "cleaned"

    assert decoder_for(CleanUp())([1, 2], True) == "cleaned"
