"""The ``think`` reasoning parser on its own (streamed in every split, tags cut anywhere), and the cached-token
counts by source from the front end's stats to the metric."""

from __future__ import annotations

import pytest

from pdserve.engine.frontend.stats import IterationStats, SequenceTimes
from pdserve.services.api.metrics import ServingMetrics
from pdserve.services.api.reasoning import ReasoningSplitter, opens_reasoning, split_reasoning

CASES = [
    # (answer, the prompt opened the block, reasoning, content)
    ("<think>plan it</think>\n\nThe answer.", False, "plan it", "The answer."),
    ("  <think></think>Hi", False, "", "Hi"),
    ("The answer. <think>no</think>", False, None, "The answer. <think>no</think>"),
    ("<thinking aloud", False, None, "<thinking aloud"),
    ("<think>cut short", False, "cut short", ""),
    ("plan it</think>Done", True, "plan it", "Done"),
    ("no close tag at all", True, "no close tag at all", ""),
    ("<thi", False, None, "<thi"),
    ("<think>a</thi", False, "a</thi", ""),
    ("<think>a < b</think>x", False, "a < b", "x"),
]


@pytest.mark.parametrize("text, opened, reasoning, content", CASES)
def test_split_whole_and_streamed(text: str, opened: bool, reasoning: str | None, content: str) -> None:
    assert split_reasoning(text, opened) == (reasoning, content)
    for size in (1, 2, 3, 5):  # the same answer in deltas of every size: tags split across them
        splitter = ReasoningSplitter(opened)
        pieces = [splitter.feed(text[i:i + size]) for i in range(0, len(text), size)] + [splitter.finish()]
        assert "".join(r for r, _ in pieces) == (reasoning or "")
        assert "".join(c for _, c in pieces) == content


def test_reasoning_is_sent_before_the_block_ends() -> None:
    splitter = ReasoningSplitter()
    assert splitter.feed("<think>one ") == ("one ", "")
    assert splitter.feed("two</") == ("two", "")  # "</" may start the closing tag: held
    assert splitter.feed("think>\n") == ("", "")
    assert splitter.feed("\nDone") == ("", "Done")


def test_a_prompt_that_opens_the_block() -> None:
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not opens_reasoning("<think>earlier</think><|im_start|>assistant\n")
    assert not opens_reasoning(None)


def test_cached_tokens_are_counted_by_source() -> None:
    metrics = ServingMetrics("m")
    it = IterationStats(timestamp=0.0)
    local, loaded = SequenceTimes(arrival=0.0, num_prompt_tokens=100), SequenceTimes(arrival=0.0, num_prompt_tokens=90)
    local.on_tokens(1.0, 1, it, num_cached=48)
    loaded.on_tokens(1.0, 1, it, num_cached=80, num_external_cached=64)  # 16 local hits, 64 loaded
    local.on_tokens(2.0, 1, it, num_cached=48)  # later tokens: the prompt is counted once
    metrics.record(None, it)
    text = metrics.render().decode()
    assert 'pdserve:prompt_tokens_cached_total{model_name="m",source="prefix_cache"} 64.0' in text
    assert 'pdserve:prompt_tokens_cached_total{model_name="m",source="connector"} 64.0' in text
